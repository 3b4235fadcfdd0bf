"""A decode step compiled into one graph: one new token for each of B sequences of a dense model.

Batch-1 decode of a 135M model is bound by per-op overhead, not by arithmetic: eager PyTorch runs ~60 small ops
per layer (norms, rotary, cache writes, residuals) with Python in between, ~20 ms per token on this CPU. This
module writes the decode step as one straight-line function over the model's weights and compiles it with
torch.compile (Inductor's C++ backend): the pointwise work of a layer fuses into a few C++ loops and the Python
dispatch disappears. Matmuls stay PyTorch's own kernels (MKL for float32, fbgemm for fp16/int8 packed weights,
which reach the graph as opaque custom ops).

Shapes: the batch size and the attended key length vary and are symbolic from the first compile, so serving
never recompiles; the key length is rounded up to a small bucket (at batch 1 the step measured 12 % faster with
32 than with 256: fewer keys read). Keys beyond a sequence's position are masked, so the bucket padding is never
read as context.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

from omnimini.engine.quant import PackedLinear
from omnimini.model.blocklinear import BlockLinear
from omnimini.model.layers import KVCache

KV_BUCKET = 32  # small: attention reads only up to the bucket; the key length is symbolic, so no recompiles

# fbgemm's packed weights are TorchScript objects that Dynamo cannot put in a graph; the graph refers to them by
# a registry index instead and calls them through a custom op (opaque to the compiler, no graph break)
_PACKED: list = []
_PACKED_LOCK = threading.Lock()


def register_packed(linear: PackedLinear) -> int:
    with _PACKED_LOCK:
        _PACKED.append((linear.matmul, linear._packed))  # what the op needs, without attribute lookups per call
        return len(_PACKED) - 1


_LIB = torch.library.Library("omnimini", "DEF")
_LIB.define("packed_linear(Tensor x, int handle, int out_features) -> Tensor")


def _packed_linear(x: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
    # the low-level registration costs ~1 us a call; torch.library.custom_op's wrapper costs ~25 us
    matmul, packed = _PACKED[handle]
    return matmul(x, packed)


_LIB.impl("packed_linear", _packed_linear, "CPU")


@torch.library.register_fake("omnimini::packed_linear")
def _(x, handle, out_features):
    return x.new_empty(x.shape[0], out_features)


def supports(model) -> str | None:
    """None when the model's decode step can be compiled, else the reason it cannot."""
    cfg = model.config
    if any(b.is_moe for b in model.blocks):
        return "MoE layers route tokens with data-dependent shapes"
    if next(model.parameters()).device.type != "cpu":
        return "the compiled decode step targets CPU"
    if cfg.qk_norm not in (None, "none", "head", "full"):
        return f"qk_norm {cfg.qk_norm!r}"
    return None


def _linear(mod, x: torch.Tensor) -> torch.Tensor:
    """x [N, in] through an nn.Linear, a BlockLinear or one of quant.py's packed linears."""
    if isinstance(mod, BlockLinear):  # omnimini's own kernel: a custom op with a fake kernel, traced as is
        return mod(x)
    if not isinstance(mod, PackedLinear):
        return F.linear(x, mod.weight, mod.bias)
    y = torch.ops.omnimini.packed_linear(x, mod.graph_handle, mod.out_features)
    return y if mod.bias is None else y + mod.bias


def _mlp(mlp, x: torch.Tensor) -> torch.Tensor:
    if hasattr(mlp, "gate_up"):  # quant.QuantSwiGLU: gate and up fused
        gu = _linear(mlp.gate_up, x)
        g, u = gu[:, : mlp.inter], gu[:, mlp.inter:]
    else:
        g, u = _linear(mlp.gate_proj, x), _linear(mlp.up_proj, x)
    return _linear(mlp.down_proj, mlp.act(g) * u)  # silu (SwiGLU) or gelu_tanh (Gemma's GeGLU)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def _attention(attn, x, cos, sin, mask, kc, vc, slots, positions, kv_len: int):
    B = x.shape[0]
    h, kvh, d = attn.h, attn.kvh, attn.d
    if attn.qkv is not None:
        q, k, v = _linear(attn.qkv, x).split([h * d, kvh * d, kvh * d], dim=-1)
    else:
        q, k, v = _linear(attn.q_proj, x), _linear(attn.k_proj, x), _linear(attn.v_proj, x)
    if attn.qk_norm == "full":
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k, v = q.view(B, h, 1, d), k.view(B, kvh, 1, d), v.view(B, kvh, 1, d)
    if attn.qk_norm == "head":
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = _rope(q, cos, sin), _rope(k, cos, sin)
    kc[slots, :, positions] = k[:, :, 0]
    vc[slots, :, positions] = v[:, :, 0]
    keys, vals = kc[slots, :, :kv_len], vc[slots, :, :kv_len]
    if B > 1:
        out = F.scaled_dot_product_attention(q, keys, vals, attn_mask=mask, enable_gqa=h != kvh, scale=attn.scale)
    else:
        # one query: written as reductions Inductor fuses with the cache reads (SDPA would first copy the keys
        # and values out of the cache, and its kernel's set-up costs more than this arithmetic); slower at B > 1
        qg = q.view(B, kvh, h // kvh, 1, d)
        scale = d ** -0.5 if attn.scale is None else attn.scale
        scores = ((qg * keys[:, :, None]).sum(-1) * scale).masked_fill(~mask, float("-inf"))  # [B, kvh, g, T]
        out = (scores.softmax(-1)[..., None] * vals[:, :, None]).sum(-2)  # [B, kvh, g, d]
    return _linear(attn.o_proj, out.reshape(B, h * d))


def decode_step(model, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                ks: list[torch.Tensor], vs: list[torch.Tensor], kv_len: int,
                cos_table: torch.Tensor, sin_table: torch.Tensor, local_cos_table: torch.Tensor,
                local_sin_table: torch.Tensor) -> torch.Tensor:
    """tokens/positions/slots [B] -> logits [B, V]; writes each layer's new key/value into ks/vs (in place).
    cos_table/sin_table [max_len, D]: the rotary angles of every cache position (see FastDecoder); local_*: those
    of sliding-window layers with their own rope base (Gemma 3; otherwise the same tensors)."""
    cfg = model.config
    x = model.embed(tokens)
    if cfg.embed_scale != 1.0:
        x = x * cfg.embed_scale
    # looked up, not computed: Inductor inlines a computed cos/sin into every layer's kernel (and every head),
    # and the trigonometry then cost more than the rest of the pointwise work together
    cos, sin = cos_table[positions][:, None, None], sin_table[positions][:, None, None]  # [B, 1, 1, D]
    lcos, lsin = local_cos_table[positions][:, None, None], local_sin_table[positions][:, None, None]
    keys = torch.arange(kv_len, device=tokens.device)[None, :]
    mask = (keys <= positions[:, None])[:, None, None]
    window_mask = mask
    if cfg.sliding_window is not None:  # sliding layers also hide keys `window` or more positions back
        window_mask = mask & (keys > positions[:, None] - cfg.sliding_window)[:, None, None]
    for i, blk in enumerate(model.blocks):
        c, s, m = (lcos, lsin, window_mask) if blk.sliding else (cos, sin, mask)
        a = _attention(blk.attn, blk.input_norm(x), c, s, m, ks[i], vs[i], slots, positions, kv_len)
        x = x + (a if blk.attn_out_norm is None else blk.attn_out_norm(a))
        y = _mlp(blk.mlp, blk.post_norm(x))
        x = x + (y if blk.mlp_out_norm is None else blk.mlp_out_norm(y))
    h = model.norm(x)
    return F.linear(h, model.embed.weight) if model.lm_head is None else _linear(model.lm_head, h)


class FastDecoder:
    """`decode_step` compiled once for all batch sizes and key lengths, bound to a model and its KV cache."""

    def __init__(self, model, cache: KVCache, compile: bool = True):
        reason = supports(model)
        if reason:
            raise ValueError(f"fast decode unavailable: {reason}")
        for mod in model.modules():  # give packed linears their registry handle once
            if isinstance(mod, PackedLinear) and not hasattr(mod, "graph_handle"):
                mod.graph_handle = register_packed(mod)
        self.model, self.cache = model, cache
        cache.reserve(cache.max_len)  # the compiled step indexes the whole cache: a grown tensor would recompile
        with torch.no_grad():  # the eager model's own rotary, so the angles match it bit for bit
            cos, sin = model.rotary(torch.arange(cache.max_len)[None])
            self.cos, self.sin = cos[0, 0].contiguous(), sin[0, 0].contiguous()
            self.local_cos, self.local_sin = self.cos, self.sin
            if model.rotary_local is not None:
                cos, sin = model.rotary_local(torch.arange(cache.max_len)[None])
                self.local_cos, self.local_sin = cos[0, 0].contiguous(), sin[0, 0].contiguous()
        # Dynamo guards on the model object: every decoder (one per served model, or per test) adds two graphs
        # (batch 1 and batch > 1) to the one cache that decode_step's code object has
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        # dynamic=True: batch size and key length are symbolic from the first compile (size 1 is still its own
        # graph), so serving never stops to recompile
        self._fn = torch.compile(decode_step, fullgraph=True, dynamic=True) if compile else decode_step

    def kv_len(self, positions: torch.Tensor) -> int:
        need = int(positions.max()) + 1
        return min(-(-need // KV_BUCKET) * KV_BUCKET, self.cache.max_len)

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """tokens/positions/slots [B] -> logits [B, V] (float32); the new keys/values land in the cache."""
        tokens, positions, slots = tokens.contiguous(), positions.contiguous(), slots.contiguous()
        return self._fn(self.model, tokens, positions, slots, self.cache.k, self.cache.v, self.kv_len(positions),
                        self.cos, self.sin, self.local_cos, self.local_sin)

    def warm_up(self, max_batch: int) -> None:
        """Compile both graphs (batch 1 and batch > 1) now. Writes only cache position 0 of the slots it uses,
        which a sequence's prefill overwrites before any query can attend to it."""
        for b in sorted({1, min(2, max_batch)}):
            # distinct tensors: Dynamo guards on aliasing, so one tensor passed twice would compile a graph that
            # real calls never match
            self(torch.zeros(b, dtype=torch.long), torch.zeros(b, dtype=torch.long), torch.arange(b))
