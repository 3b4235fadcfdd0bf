"""SmoothQuant-style rescaling before int8 quantization: move activation outliers into the weights.

fbgemm's int8 GEMM quantizes each activation row to 7 bits with one scale, so a few outlier channels (LLMs have
channels 10-100x larger than the rest) waste most of the range. For a linear y = x W^T we may divide input
channel j of x by s_j and multiply column j of W by s_j without changing y; with s_j = max|x_j|^a / max|W_j|^(1-a)
(a = 0.5) both sides get similar ranges. The division is folded into whatever produces x, so it costs nothing at
run time:
- q/k/v and gate/up read RMSNorm outputs: divide the norm's weight;
- down_proj reads silu(gate) * up: divide up's rows;
- o_proj reads the attention output, a mix of v rows: divide v's rows (one scale per KV-head channel, shared by
  the query heads of its group, since they all read that channel).
Activation maxima come from one forward pass over calibration tokens. MoE MLPs are left alone (the norm also
feeds the router). Measured on SmolLM2-135M, WikiText-2 perplexity +8.9% -> +5.7% over float32 (README).
"""

from __future__ import annotations

import torch
from torch import nn

from omnimini.model.layers import SwiGLU

ALPHA = 0.5

# a few sentences of ordinary text and a chat exchange: enough tokens to see each layer's outlier channels
CALIBRATION_TEXT = (
    "The committee met on Tuesday to review the budget for the next fiscal year. After a long discussion about "
    "schools, roads and the new library, the members agreed to postpone the vote until more figures were available. "
    "In physics, energy is the quantitative property that is transferred to a body or to a physical system. "
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n"
    "User: What is the capital of Italy?\nAssistant: The capital of Italy is Rome.\n"
    "User: Write a short poem about autumn leaves.\nAssistant: Red and gold they drift and fall, "
    "whispering softly, one and all. 1, 2, 3, 42, 1999, 3.14159; Paris, Tokyo, Nairobi, Lima."
)


def _scales(act_max: torch.Tensor, weight_max: torch.Tensor, alpha: float) -> torch.Tensor:
    return act_max.clamp_min(1e-5).pow(alpha) / weight_max.clamp_min(1e-5).pow(1 - alpha)


@torch.no_grad()
def input_maxima(model, calib_ids: list[int]) -> dict[nn.Linear, torch.Tensor]:
    """Per-input-channel max |x| of every nn.Linear in the decoder blocks over one pass of `calib_ids`."""
    stats: dict[nn.Linear, torch.Tensor] = {}

    def hook(mod, inputs):
        a = inputs[0].reshape(-1, inputs[0].shape[-1]).abs().amax(0).float()
        stats[mod] = torch.maximum(stats[mod], a) if mod in stats else a

    hooks = [m.register_forward_pre_hook(hook) for m in model.blocks.modules() if isinstance(m, nn.Linear)]
    try:
        model(torch.tensor([calib_ids[: model.config.max_seq_len]]))
    finally:
        for h in hooks:
            h.remove()
    return stats


def _smooth_into_norm(norm, linears: list[nn.Linear], act_max: torch.Tensor, alpha: float) -> None:
    s = _scales(act_max, torch.cat([lin.weight for lin in linears]).abs().amax(0), alpha)
    norm.weight.div_(s)
    for lin in linears:
        lin.weight.mul_(s)


def _smooth_down(mlp: SwiGLU, act_max: torch.Tensor, alpha: float) -> None:
    s = _scales(act_max, mlp.down_proj.weight.abs().amax(0), alpha)
    mlp.up_proj.weight.div_(s[:, None])
    mlp.down_proj.weight.mul_(s)


def _smooth_o(attn, act_max: torch.Tensor, alpha: float) -> None:
    group = attn.h // attn.kvh
    per_kv = lambda t: t.view(attn.kvh, group, attn.d).amax(1)  # noqa: E731
    s = _scales(per_kv(act_max), per_kv(attn.o_proj.weight.abs().amax(0)), alpha)  # [kvh, d]
    attn.v_proj.weight.div_(s.reshape(-1, 1))
    if attn.v_proj.bias is not None:
        attn.v_proj.bias.div_(s.reshape(-1))
    attn.o_proj.weight.mul_(s[:, None, :].expand(attn.kvh, group, attn.d).reshape(-1))


@torch.no_grad()
def smooth_model(model, calib_ids: list[int], alpha: float = ALPHA):
    """Rescale `model` (float, unquantized) in place so its outputs are unchanged and int8 loses less."""
    if not calib_ids:
        raise ValueError("smoothing needs at least one calibration token")
    stats = input_maxima(model, calib_ids)
    for blk in model.blocks:
        a = blk.attn
        if a.q_proj is None:
            raise ValueError("smooth_model runs before quantize_model (the projections are already fused)")
        _smooth_into_norm(blk.input_norm, [a.q_proj, a.k_proj, a.v_proj], stats[a.q_proj], alpha)
        _smooth_o(a, stats[a.o_proj], alpha)
        if isinstance(blk.mlp, SwiGLU):
            _smooth_into_norm(blk.post_norm, [blk.mlp.gate_proj, blk.mlp.up_proj], stats[blk.mlp.gate_proj], alpha)
            _smooth_down(blk.mlp, stats[blk.mlp.down_proj], alpha)
    return model
