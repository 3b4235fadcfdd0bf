"""Turn logits into tokens: temperature, top-k, top-p, penalties and logit bias, with per-request seeds."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 -> greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 -> off
    seed: int | None = None
    max_tokens: int = 256
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: bool = False
    top_logprobs: int = 0
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0 or self.top_k == 1


def make_generator(seed: int | None, device="cpu") -> torch.Generator | None:
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def adjust_logits(logits: torch.Tensor, p: SamplingParams, counts: torch.Tensor | None = None) -> torch.Tensor:
    """Apply logit_bias and OpenAI-style presence/frequency penalties to a [V] float32 row."""
    if p.logit_bias:
        ids = torch.tensor(list(p.logit_bias), dtype=torch.long)
        logits = logits.index_add(0, ids, torch.tensor(list(p.logit_bias.values()), dtype=logits.dtype))
    if counts is not None and (p.presence_penalty or p.frequency_penalty):
        c = counts.to(logits.dtype)
        logits = logits - p.frequency_penalty * c - p.presence_penalty * (c > 0).to(logits.dtype)
    return logits


def filter_logits(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Temperature, top-k and top-p (nucleus) on a [V] row; removed entries become -inf."""
    logits = logits / max(p.temperature, 1e-5)
    if p.top_k and p.top_k < logits.shape[-1]:
        kth = logits.topk(p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, idx = logits.sort(descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > p.top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.masked_fill(drop.scatter(0, idx, drop), float("-inf"))
    return logits


def sample_token(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator | None = None) -> int:
    if p.greedy:
        return int(logits.argmax())
    probs = filter_logits(logits.float(), p).softmax(-1)
    # inverse CDF: one cumsum and a binary search (~60 us over a 49k vocabulary; torch.multinomial took ~1 ms,
    # a sixth of a batch-1 token). right=True never lands on a zero-probability token (its cdf equals the previous)
    cdf = probs.cumsum(-1)
    u = torch.rand(1, generator=gen, dtype=cdf.dtype) * cdf[-1]
    i = int(torch.searchsorted(cdf, u, right=True).clamp_max(probs.numel() - 1))
    return i if probs[i] > 0 else int(torch.multinomial(probs, 1, generator=gen))  # u rounded up to the total
