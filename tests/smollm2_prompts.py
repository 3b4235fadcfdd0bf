"""The 5 fixed chat prompts on which SmolLM2 greedy answers are compared (parity and quantization)."""

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "What is 12 + 30?",
    "Name three primary colors.",
    "Translate 'good morning' to Spanish.",
]
