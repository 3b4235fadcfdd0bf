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
        if self.cfg.routed_scaling_factor != 1.0:
            weights = weights * self.cfg.routed_scaling_factor
        return RouterOutput(weights.to(x.dtype), experts, probs, logits)


def expert_counts(experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Tokens routed to each expert. (torch.bincount's output size depends on the data, which breaks a
    torch.compile graph; a scatter-add into E slots does not.)"""
    flat = experts.flatten()
    return torch.zeros(num_experts, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


def switch_aux_loss(probs: torch.Tensor, experts: torch.Tensor, num_experts: int,
                    counts: torch.Tensor | None = None) -> torch.Tensor:
    """E * sum_e f_e * P_e (Switch Transformer); equals 1 for perfectly uniform routing, larger when skewed."""
    counts = expert_counts(experts, num_experts) if counts is None else counts
    f = counts.to(probs.dtype) / experts.numel()
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
        counts = expert_counts(r.experts, self.cfg.num_experts)
        out = self.dispatch(x, r.weights, r.experts, counts)
        if self.shared is not None:
            s = self.shared(x)
            if self.shared_gate is not None:
                s = torch.sigmoid(self.shared_gate(x)) * s
            out = out + s
        stats = {"load": counts}
        if self.training:
            stats["aux_loss"] = switch_aux_loss(r.probs, r.experts, self.cfg.num_experts, counts)
            stats["z_loss"] = z_loss(r.logits)
        return out.reshape(shape), stats

    def expert(self, e: int, h: torch.Tensor) -> torch.Tensor:
        if self.expert_fn is not None:
            return self.expert_fn(e, h)
        gate, up = F.linear(h, self.gate_up[e]).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.down[e])

    def dispatch(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor,
                 counts: torch.Tensor | None = None) -> torch.Tensor:
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
        counts = expert_counts(experts, self.cfg.num_experts) if counts is None else counts
        xs = x.index_select(0, token_of)  # (faster than x[token_of] both ways: a plain gather / index_add)
        if self.expert_fn is not None:  # engine: per-expert replacement MLPs (quantized weights)
            ys = torch.empty_like(xs)
            start = 0
            for e, n in enumerate(counts.tolist()):
                if n:
                    ys[start:start + n] = self.expert_fn(e, xs[start:start + n])
                    start += n
        else:
            ys = experts_swiglu(xs, self.gate_up, self.down, counts)
        # scale each (token, expert) row by its routing weight and sum the k rows of each token in place
        ys = ys * weights.flatten().index_select(0, order)[:, None]
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


# ---- grouped expert SwiGLU ---------------------------------------------------------------------------------
# One op for all experts of a layer: forward and backward each run a plain matmul per expert that received tokens
# (written in place into one output, no per-expert autograd nodes, no gathers of weight slices whose backward
# would zero-fill a full [E, ...] gradient per expert) and do the SwiGLU pointwise work once over all rows.
# It is a custom op so torch.compile treats it as one opaque node instead of breaking the graph on the
# data-dependent per-expert row counts.


def _spans(counts: torch.Tensor) -> list[tuple[int, int, int]]:
    spans, start = [], 0
    for e, n in enumerate(counts.tolist()):
        if n:
            spans.append((e, start, start + n))
        start += n
    return spans


@torch.library.custom_op("omnimini::experts_swiglu", mutates_args=())
def _experts_fwd(xs: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                 counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """xs [S, H] rows sorted by expert, counts [E] rows per expert -> (y [S, H], gate_up output h [S, 2I])."""
    inter = down.shape[2]
    h = xs.new_empty(xs.shape[0], 2 * inter)
    y = xs.new_empty(xs.shape)
    spans = _spans(counts)
    for e, a, b in spans:
        torch.mm(xs[a:b], gate_up[e].t(), out=h[a:b])
    act = F.silu(h[:, :inter]).mul_(h[:, inter:])
    for e, a, b in spans:
        torch.mm(act[a:b], down[e].t(), out=y[a:b])
    return y, h


@_experts_fwd.register_fake
def _(xs, gate_up, down, counts):
    return xs.new_empty(xs.shape), xs.new_empty(xs.shape[0], 2 * down.shape[2])


@torch.library.custom_op("omnimini::experts_swiglu_backward", mutates_args=())
def _experts_bwd(dy: torch.Tensor, xs: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, h: torch.Tensor,
                 counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    inter = down.shape[2]
    spans = _spans(counts)
    # g and u are column halves of h: strided views. silu_backward is ~3x slower on a strided input, so it
    # gets a contiguous copy of g (a cheap pass); the multiplies do not care
    g, u = h[:, :inter].contiguous(), h[:, inter:]
    s = F.silu(g)
    act = s * u
    d_xs, d_gate_up, d_down = torch.empty_like(xs), torch.empty_like(gate_up), torch.empty_like(down)
    idle = sorted(set(range(down.shape[0])) - {e for e, _, _ in spans})
    if idle:  # experts that got no tokens this step have zero gradient
        d_gate_up[idle] = 0
        d_down[idle] = 0
    d_act = xs.new_empty(act.shape)
    for e, a, b in spans:
        torch.mm(dy[a:b], down[e], out=d_act[a:b])
        torch.mm(dy[a:b].t(), act[a:b], out=d_down[e])
    dh = torch.empty_like(h)
    dh[:, :inter] = torch.ops.aten.silu_backward(d_act * u, g)
    torch.mul(d_act, s, out=dh[:, inter:])
    for e, a, b in spans:
        torch.mm(dh[a:b], gate_up[e], out=d_xs[a:b])
        torch.mm(dh[a:b].t(), xs[a:b], out=d_gate_up[e])
    return d_xs, d_gate_up, d_down


@_experts_bwd.register_fake
def _(dy, xs, gate_up, down, h, counts):
    return torch.empty_like(xs), torch.empty_like(gate_up), torch.empty_like(down)


def _experts_setup(ctx, inputs, output):
    xs, gate_up, down, counts = inputs
    ctx.save_for_backward(xs, gate_up, down, output[1], counts)
    ctx.set_materialize_grads(False)  # h is returned only to be saved: it never receives a gradient


def _experts_backward(ctx, dy, _dh):
    xs, gate_up, down, h, counts = ctx.saved_tensors
    d_xs, d_gate_up, d_down = _experts_bwd(dy.contiguous(), xs, gate_up, down, h, counts)
    return d_xs, d_gate_up, d_down, None


_experts_fwd.register_autograd(_experts_backward, setup_context=_experts_setup)


def experts_swiglu(xs: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """SwiGLU of each row of xs (sorted by expert, counts[e] rows for expert e) through its expert's weights."""
    dtype = xs.dtype
    dev = xs.device.type
    if torch.is_autocast_enabled(dev):  # custom ops are not autocast-aware: cast as autocast would for a matmul
        low = torch.get_autocast_dtype(dev)
        xs, gate_up, down = xs.to(low), gate_up.to(low), down.to(low)
    return _experts_fwd(xs.contiguous(), gate_up.contiguous(), down.contiguous(), counts)[0].to(dtype)
