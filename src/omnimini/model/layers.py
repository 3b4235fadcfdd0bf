"""Decoder building blocks: RMSNorm, rotary embeddings, grouped-query attention with a KV cache, SwiGLU."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from omnimini import kernels
from omnimini.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if kernels.usable(x) and self.weight.dtype == torch.float32:  # inference: one pass over x, no dispatch
            return torch.ops.omnimini_cpu.rms_norm(x.reshape(-1, x.shape[-1]), self.weight, self.eps).view(x.shape)
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # one fused op (decode is op-bound)
        # normalise in float32 so bf16 activations on GPU keep their precision here
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


def rope_inv_freq(cfg: ModelConfig, local: bool = False) -> torch.Tensor:
    """Inverse frequencies of the rotary angles; local=True: the sliding layers' own unscaled base (Gemma 3)."""
    d = cfg.dim_head
    theta = cfg.rope_local_theta if local else cfg.rope_theta
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    sc = {} if local else cfg.rope_scaling or {}
    kind = sc.get("rope_type", sc.get("type"))
    if kind == "linear":
        inv = inv / sc["factor"]
    elif kind == "llama3":
        # Llama 3.1: keep high frequencies, divide low ones by factor, blend in between
        factor, lo, hi = sc["factor"], sc.get("low_freq_factor", 1.0), sc.get("high_freq_factor", 4.0)
        old_ctx = sc.get("original_max_position_embeddings", 8192)
        wavelen = 2 * math.pi / inv
        smooth = ((old_ctx / wavelen) - lo) / (hi - lo)
        scaled = torch.where(wavelen > old_ctx / lo, inv / factor, inv)
        mid = (wavelen <= old_ctx / lo) & (wavelen >= old_ctx / hi)
        inv = torch.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
    elif kind not in (None, "default"):
        raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: linear, llama3)")
    return inv.float()


def mrope_axes(section: list[int] | None) -> torch.Tensor | None:
    """Which coordinate (0 temporal, 1 height, 2 width) each rotary frequency reads under M-RoPE: the first
    section[0] frequencies the temporal one, the next section[1] the height, the rest the width."""
    if section is None:
        return None
    return torch.cat([torch.full((n,), axis, dtype=torch.long) for axis, n in enumerate(section)])


class Rotary(nn.Module):
    """Rotate-half RoPE (the Llama/HF convention); cos/sin are looked up per position so batches may differ.

    With cfg.mrope_section positions may also be [B, T, 3] (temporal, height, width: M-RoPE), each frequency
    rotating by its own coordinate; [B, T] positions are then the same position in all three, plain RoPE."""

    def __init__(self, cfg: ModelConfig, local: bool = False):
        super().__init__()
        self.cfg, self.local = cfg, local
        self.register_buffer("inv_freq", rope_inv_freq(cfg, local), persistent=False)

    def reset(self, device=None) -> None:
        """Recompute the (non-persistent) frequencies, e.g. after building the model on the meta device."""
        self.inv_freq = rope_inv_freq(self.cfg, self.local).to(device)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if positions.dim() == 3:  # M-RoPE: [B, T, 3]
            if self.cfg.mrope_section is None:
                raise ValueError("3D (temporal, height, width) positions need a model with mrope_section")
            # made per call, not a buffer: the model is built on the meta device, which would leave it empty
            axes = mrope_axes(self.cfg.mrope_section).to(positions.device)
            coords = positions[..., axes]  # [B, T, D/2]: each frequency's coordinate
            freqs = coords.float() * self.inv_freq
        else:
            freqs = positions.float()[..., None] * self.inv_freq  # [B, T, D/2]
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos()[:, None], emb.sin()[:, None]  # [B, 1, T, D]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class KVCache:
    """Slot-based static cache: one row per sequence slot, keys/values written at explicit positions.

    k[layer]: [slots, kv_heads, capacity, head_dim]. The caller
    (generator/engine) tracks each slot's length and passes positions; attention masks keys by position, so stale
    entries beyond a slot's length are never read.

    `reserve` positions are allocated up front (default: all of max_len); the model's forward grows the cache
    (`reserve(n)`) before it writes past that, in GROW-position steps or doubling, up to max_len. The engine starts
    small: 16 slots x 2048 positions of SmolLM2's float16 keys/values are ~755 MB, most of a short-chat server's
    memory, and a server that never sees long prompts never needs them.
    """

    GROW = 256

    def __init__(self, cfg: ModelConfig, slots: int, max_len: int, device=None, dtype=torch.float32,
                 reserve: int | None = None):
        self.slots, self.max_len = slots, max_len
        self._dims = (cfg.num_kv_heads, cfg.dim_head)
        cap = max_len if reserve is None else max(1, min(reserve, max_len))
        self.k = [self._zeros(cap, device, dtype) for _ in range(cfg.num_layers)]
        self.v = [self._zeros(cap, device, dtype) for _ in range(cfg.num_layers)]

    def _zeros(self, cap: int, device, dtype) -> torch.Tensor:
        kvh, d = self._dims
        return torch.zeros((self.slots, kvh, cap, d), device=device, dtype=dtype)

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    def reserve(self, n: int) -> None:
        """Make positions [0, n) writable (n capped at max_len), keeping what is cached."""
        n, cap = min(n, self.max_len), self.capacity
        if n <= cap:
            return
        new = min(self.max_len, max(-(-n // self.GROW) * self.GROW, 2 * cap))
        for store in (self.k, self.v):
            for i, old in enumerate(store):
                t = self._zeros(new, old.device, old.dtype)
                t[:, :, :cap] = old
                store[i] = t

    def shrink(self, n: int) -> None:
        """Give back positions [n, capacity) (their contents are dropped): for a cache no sequence is using."""
        n = max(1, min(n, self.max_len))
        if n >= self.capacity:
            return
        for store in (self.k, self.v):
            for i, old in enumerate(store):
                store[i] = old[:, :, :n].clone()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.h, self.kvh, self.d = cfg.num_heads, cfg.num_kv_heads, cfg.dim_head
        self.q_proj = nn.Linear(cfg.hidden_size, self.h * self.d, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.kvh * self.d, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.kvh * self.d, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.h * self.d, cfg.hidden_size, bias=False)
        self.qkv = None  # the engine may fuse q/k/v into one (quantized) matmul: one call, one read of x
        self.scale = cfg.attn_scale  # None: SDPA's 1/sqrt(head_dim)
        self.window = cfg.sliding_window if cfg.layer_slides(layer) else None  # for the decode kernel
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm == "head":
            self.q_norm, self.k_norm = RMSNorm(self.d, cfg.rms_norm_eps), RMSNorm(self.d, cfg.rms_norm_eps)
        elif cfg.qk_norm == "full":
            self.q_norm = RMSNorm(self.h * self.d, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.kvh * self.d, cfg.rms_norm_eps)

    def forward(self, x, rope, positions, cache: KVCache | None = None, slots=None, attn_mask=None):
        B, T, _ = x.shape
        if T == 1 and cache is not None and self._native_decode(x, cache):
            return self.o_proj(self._decode_step(x, rope, positions, cache, slots))
        if self.qkv is not None:
            q, k, v = self.qkv(x).split([self.h * self.d, self.kvh * self.d, self.kvh * self.d], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, T, self.h, self.d).transpose(1, 2)
        k = k.view(B, T, self.kvh, self.d).transpose(1, 2)
        v = v.view(B, T, self.kvh, self.d).transpose(1, 2)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = self._cache_update(cache, k, v, positions, slots)
            # a float16 cache (kv_cache="fp16") is read back at the queries' precision: SDPA needs one dtype
            k, v = k.to(q.dtype), v.to(q.dtype)
        gqa = self.h != self.kvh
        if attn_mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=gqa, scale=self.scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=gqa, scale=self.scale)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.h * self.d))

    def _native_decode(self, x, cache: KVCache) -> bool:
        """One new token per sequence, inference on CPU in float32 with fused q/k/v: omnimini's attention kernel
        (rotary, cache write and attention over the cache in one op) when the kernels are available."""
        kc = cache.k[self.layer]
        return (self.native_decode_possible() and kc.dtype in (torch.float32, torch.float16)
                and kc.is_contiguous() and kernels.usable(x))

    def native_decode_possible(self) -> bool:
        """Whether this layer's single-token steps can run attn_decode (fused q/k/v, no q/k norm); the kernels'
        availability and the input's dtype are checked per call."""
        return self.qkv is not None and self.qk_norm in (None, "none")

    def _decode_step(self, x, rope, positions, cache: KVCache, slots):
        B = x.shape[0]
        cos, sin = (t.reshape(B, self.d) for t in rope)  # [B, 1, 1, D]: the model's own angles
        rows = slots if slots is not None else torch.arange(B)
        out = torch.ops.omnimini_cpu.attn_decode(self.qkv(x.view(B, -1)), cache.k[self.layer],
                                                 cache.v[self.layer], rows, positions.view(B), cos, sin,
                                                 self.h, self.kvh, self.scale or 0.0, self.window or 0)
        return out.view(B, 1, self.h * self.d)

    def _cache_update(self, cache: KVCache, k, v, positions, slots):
        kc, vc = cache.k[self.layer], cache.v[self.layer]
        kv_len = min(int(positions.max()) + 1, cache.max_len)
        rows = slots if slots is not None else torch.arange(k.shape[0], device=k.device)
        pos = positions.clamp(max=cache.max_len - 1)  # padded tail tokens may run past the end: never read
        kc[rows[:, None], :, pos] = k.transpose(1, 2).to(kc.dtype)
        vc[rows[:, None], :, pos] = v.transpose(1, 2).to(vc.dtype)
        if slots is None:
            return kc[: k.shape[0], :, :kv_len], vc[: k.shape[0], :, :kv_len]
        return kc[slots, :, :kv_len], vc[slots, :, :kv_len]


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


# the gated MLP's activation by config name (config.ACTIVATIONS)
ACTIVATION_FNS = {"silu": F.silu, "gelu_tanh": gelu_tanh}


class SwiGLU(nn.Module):
    """Gated MLP down(act(gate(x)) * up(x)): SwiGLU with silu (the default), GeGLU with gelu_tanh (Gemma)."""

    def __init__(self, hidden: int, inter: int, act: str = "silu"):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)
        self.act_name, self.act = act, ACTIVATION_FNS[act]

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
