"""Published figures of GPT-4o mini (the reference every report compares against)."""

GPT4O_MINI = {
    "name": "gpt-4o-mini (published)",
    "type": "MoE",
    "total_params": 8e9,  # estimate
    "tokens": 13e12,  # estimate
    "scores": {"mmlu": 82.0, "gpqa": 40.2, "eb_alfred": 24.0, "eb_habitat": 32.7, "eb_navigation": 33.3},
}

CHINCHILLA_RATIO = 20.0  # compute-optimal tokens per parameter (Hoffmann et al., 2022)


def alscore(params_b: float, tokens_b: float) -> float:
    """ALScore = sqrt(params_B x tokens_B) / 300 (~1.1 for GPT-4o mini)."""
    return (params_b * tokens_b) ** 0.5 / 300


def ratio_verdict(ratio: float) -> str:
    if ratio < 0.75 * CHINCHILLA_RATIO:
        return f"under-trained: below the compute-optimal ~{CHINCHILLA_RATIO:.0f}:1 (Chinchilla)"
    if ratio <= 1.5 * CHINCHILLA_RATIO:
        return f"about compute-optimal (Chinchilla ~{CHINCHILLA_RATIO:.0f}:1)"
    return (f"beyond compute-optimal (Chinchilla ~{CHINCHILLA_RATIO:.0f}:1): trained longer to make a "
            "smaller model stronger at inference time")
