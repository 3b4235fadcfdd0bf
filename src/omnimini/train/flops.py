"""FLOP accounting and model-FLOPs utilisation (MFU)."""

from __future__ import annotations

import time

import torch

from omnimini.config import ModelConfig, param_counts

# dense bf16 peak (no sparsity) per GPU, by name fragment
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "4090": 165.0}


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x active matmul params (forward + backward) + causal attention scores.

    The embedding lookup is not a matmul, but its row is counted in `active_params` once as the (tied) LM
    head, which is. The attention term is 6 * L * (q width) * T (QK^T and PV, halved for causality, x3 for
    backward); the vision encoder is left out (a small share of tokens)."""
    active = param_counts(cfg)["active_params"]
    if not cfg.tie_embeddings:
        active -= cfg.vocab_size * cfg.hidden_size  # embedding rows are looked up, not multiplied
    attn = 6 * cfg.num_layers * cfg.num_heads * cfg.dim_head * seq_len
    return 6 * active + attn


def measured_cpu_peak(dtype=torch.float32, n: int = 512, seconds: float = 0.3) -> float:
    """Achievable matmul FLOP/s on this CPU (what MFU is measured against when no peak is given)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    t0, reps = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


def peak_flops(device: torch.device, override_tflops: float | None = None) -> float:
    if override_tflops:
        return override_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tf in GPU_PEAK_TFLOPS.items():
            if key in name:
                return tf * 1e12
        return 100e12
    return measured_cpu_peak()
