"""AdamW with weight-decay groups and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float, lr: float = 1e-3, vision_lr_mult: float = 1.0) -> list[dict]:
    """Decay only matrices of linear layers and experts; norms, biases and embeddings are not decayed
    (decaying them only fights the normalisation and shrinks rare tokens' embeddings). The vision encoder and
    projector may train at a lower learning rate: their output enters the residual stream un-normalised, and at
    a small LM's learning rate Adam inflates it into a constant "sink" that drowns the image content."""
    groups = {(d, v): [] for d in (True, False) for v in (False, True)}
    embed_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim < 2 or id(p) in embed_ids or "norm" in name or name.endswith("bias")
        groups[(not no_decay, name.startswith("vision."))].append(p)
    return [{"params": ps, "weight_decay": weight_decay if decay else 0.0,
             "lr": lr * (vision_lr_mult if vis else 1.0)}
            for (decay, vis), ps in groups.items() if ps]


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1 over `warmup` steps, then cosine decay to `min_ratio` at `total`."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: nn.Module, cfg) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    groups = param_groups(model, cfg.weight_decay, cfg.lr, cfg.vision_lr_mult)
    # fused: one kernel updates every parameter of a group (the default loops over parameters, a few ops each:
    # at a small model that is a visible share of the step); FSDP's sharded DTensors take the foreach path
    fused = all(type(p) is nn.Parameter and p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, fused=fused or None,
                            foreach=None if fused else True)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio))
    return opt, sched
