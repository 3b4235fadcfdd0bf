"""The LM loss of a training step: per-token cross entropy, weighted and summed, in one autograd node."""

from __future__ import annotations

import torch


class _WeightedCE(torch.autograd.Function):
    """sum_i w_i * CE(logits_i, label_i), labels == ignore_index contribute nothing.

    F.cross_entropy goes through log_softmax, whose forward and backward each sweep the [N, V] logits with an
    exp; here the forward keeps exp(logits - max) and the backward turns it into softmax - onehot in place, so a
    step does one exp pass and allocates one [N, V] buffer instead of three (at a small model the vocabulary
    projection's softmax is a tenth of the step).
    """

    @staticmethod
    def forward(ctx, logits, labels, weights, ignore_index: int, overwrite: bool):
        w = weights.to(logits.dtype) * (labels != ignore_index)
        safe = labels.clamp_min(0)[:, None]
        picked = logits.gather(-1, safe)
        m = logits.amax(-1, keepdim=True)
        # overwrite: the caller has no further use for the logits, so exp(logits - max) takes their memory (no
        # new [N, V] buffer). Anything that saved them for its backward would fail loudly (version counter).
        p = logits.sub_(m).exp_() if overwrite else (logits - m).exp_()
        s = p.sum(-1, keepdim=True)
        nll = s.log() + m - picked
        ctx.save_for_backward(p, s, safe, w)
        return (nll.squeeze(-1) * w).sum()

    @staticmethod
    def backward(ctx, grad):
        p, s, safe, w = ctx.saved_tensors
        gw = (grad * w)[:, None]
        d = p.mul_(gw / s)  # p is used once: reuse its memory for the gradient
        d.scatter_add_(-1, safe, -gw)
        return d, None, None, None, None


def weighted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
                           ignore_index: int = -100, overwrite_logits: bool = False) -> torch.Tensor:
    """logits [..., V], labels [...], weights broadcastable to labels -> sum of weight x token cross entropy.

    overwrite_logits=True reuses the logits' memory (they are garbage afterwards): for a training step that
    only needs the loss."""
    w = torch.broadcast_to(weights, labels.shape).reshape(-1)
    return _WeightedCE.apply(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), w, ignore_index,
                             overwrite_logits)
