"""Weight formats: omnimini checkpoints, Hugging Face safetensors, GGUF."""
