"""Mixture-of-Experts FFN: float32 top-k router, fused expert weights, sorted (dropless) dispatch, balance losses."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from omnimini.config import MoEConfig
from omnimini.model.layers import SwiGLU


@dataclass
class RouterOutput:
    weights: torch.Tensor  # [N, k] combine weights (in x's dtype)
    experts: torch.Tensor  # [N, k] chosen expert ids
    probs: torch.Tensor  # [N, E] float32 scores (for the aux loss)
    logits: torch.Tensor  # [N, E] float32 (for the z-loss)


class Router(nn.Module):
    def __init__(self, hidden: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, hidden))
        nn.init.normal_(self.weight, std=hidden ** -0.5)
        # aux-loss-free balancing (DeepSeek-V3): a bias used only to *select* experts, not to weight them
        self.register_buffer("selection_bias", torch.zeros(cfg.num_experts))

    def forward(self, x: torch.Tensor) -> RouterOutput:
        logits = F.linear(x.float(), self.weight.float())
        probs = logits.softmax(-1) if self.cfg.score_func == "softmax" else logits.sigmoid()
        if self.cfg.bias_update_rate > 0:
            _, experts = (probs + self.selection_bias).topk(self.cfg.top_k, dim=-1)
            weights = probs.gather(-1, experts)
        else:
            weights, experts = probs.topk(self.cfg.top_k, dim=-1)
        if self.cfg.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-20)
        weights = weights * self.cfg.routed_scaling_factor
        return RouterOutput(weights.to(x.dtype), experts, probs, logits)


def switch_aux_loss(probs: torch.Tensor, experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """E * sum_e f_e * P_e (Switch Transformer); equals 1 for perfectly uniform routing, larger when skewed."""
    counts = torch.bincount(experts.flatten(), minlength=num_experts).to(probs.dtype)
    f = counts / experts.numel()
    p = probs.mean(0)
    return num_experts * (f * p).sum()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(logits, dim=-1).pow(2).mean()


class MoE(nn.Module):
    """Experts stored fused per layer: gate_up [E, 2I, H] (gate rows first), down [E, H, I]."""

    def __init__(self, hidden: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        E, I = cfg.num_experts, cfg.expert_intermediate
        self.router = Router(hidden, cfg)
        self.gate_up = nn.Parameter(torch.empty(E, 2 * I, hidden))
        self.down = nn.Parameter(torch.empty(E, hidden, I))
        nn.init.normal_(self.gate_up, std=hidden ** -0.5)
        nn.init.normal_(self.down, std=I ** -0.5)
        self.shared = SwiGLU(hidden, cfg.shared_width) if cfg.shared_width else None
        self.shared_gate = nn.Linear(hidden, 1, bias=False) if cfg.shared_expert_gate else None
        self.expert_fn = None  # optional replacement for one expert's MLP (quantized engine weights)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        r = self.router(x)
        out = self.dispatch(x, r.weights, r.experts)
        if self.shared is not None:
            s = self.shared(x)
            if self.shared_gate is not None:
                s = torch.sigmoid(self.shared_gate(x)) * s
            out = out + s
        stats = {"load": torch.bincount(r.experts.flatten(), minlength=self.cfg.num_experts)}
        if self.training:
            stats["aux_loss"] = switch_aux_loss(r.probs, r.experts, self.cfg.num_experts)
            stats["z_loss"] = z_loss(r.logits)
        return out.reshape(shape), stats

    def expert(self, e: int, h: torch.Tensor) -> torch.Tensor:
        if self.expert_fn is not None:
            return self.expert_fn(e, h)
        gate, up = F.linear(h, self.gate_up[e]).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.down[e])

    def dispatch(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """Sort (token, expert) pairs by expert and run one matmul per expert that received tokens.

        Only the chosen experts' weights are read, so a decode step (a handful of tokens) costs top_k experts,
        not all of them: decode cost tracks the active parameters.
        """
        if experts.numel() <= 8 and not torch.is_grad_enabled():  # decode: a few tokens, no sort/scatter
            return self._dispatch_few(x, weights, experts)
        k = experts.shape[1]
        flat = experts.flatten()
        order = flat.argsort(stable=True)
        token_of = order // k
        counts = torch.bincount(flat, minlength=self.cfg.num_experts).tolist()
        xs = x[token_of]
        ys = torch.empty_like(xs)
        start = 0
        for e, n in enumerate(counts):
            if n:
                ys[start:start + n] = self.expert(e, xs[start:start + n])
                start += n
        ys = ys * weights.flatten()[order, None]
        return torch.zeros_like(x).index_add_(0, token_of, ys)

    def _dispatch_few(self, x, weights, experts):
        # group the handful of tokens by expert so each chosen expert's weights are read once
        chosen = experts.tolist()
        if len(chosen) == 1:  # batch-1 decode: plain sum over the k experts, no scatter
            w = weights[0].tolist()
            out = self.expert(chosen[0][0], x) * w[0]
            for j in range(1, len(w)):
                out = out + self.expert(chosen[0][j], x) * w[j]
            return out
        by_expert: dict[int, list[tuple[int, int]]] = {}
        for t, row in enumerate(chosen):
            for j, e in enumerate(row):
                by_expert.setdefault(e, []).append((t, j))
        out = torch.zeros_like(x)
        for e, pairs in by_expert.items():
            rows = [t for t, _ in pairs]
            y = self.expert(e, x[rows])
            w = weights[rows, [j for _, j in pairs]][:, None]
            out.index_add_(0, torch.tensor(rows, device=x.device), y * w)
        return out

    @torch.no_grad()
    def update_selection_bias(self, load: torch.Tensor) -> None:
        """Aux-loss-free balancing step: raise the bias of under-loaded experts, lower over-loaded ones."""
        if self.cfg.bias_update_rate > 0:
            err = load.float().mean() - load.float()
            self.router.selection_bias += self.cfg.bias_update_rate * err.sign()
