"""GGUF block formats in PyTorch: quantize float weights into blocks, dequantize blocks, the reference matmul.

A weight [N, K] in a block format is a uint8 tensor [N, K/32 * block_bytes], each row its K/32 blocks of 32
weights in GGUF's byte layout (see csrc/qlinear.cpp), so blocks read from a GGUF file are used as they are.
Quantization follows ggml's rounding: Q8_0 d = max|w| / 127; Q4_0 d = w_maxabs / -8 (signed), q = w/d + 8
clamped to 0..15; Q4_1 d = (max - min) / 15, m = min, q = (w - m) / d rounded. Scales are stored as float16.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

QK = 32


@dataclass(frozen=True)
class BlockFormat:
    name: str  # the --quantize spelling, GGUF's type name upper-cased
    code: int  # the kernel's format number (csrc/qlinear.cpp: enum Format)
    block_bytes: int
    bits_per_weight: float


FORMATS = {f.name: f for f in (BlockFormat("q8_0", 0, 34, 8.5), BlockFormat("q4_0", 1, 18, 4.5),
                               BlockFormat("q4_1", 2, 20, 5.0))}


class BlockFormatError(ValueError):
    """An unknown block format, or weights whose blocks cannot be used (wrong size, NaN/inf scales)."""


def get_format(name: str) -> BlockFormat:
    fmt = FORMATS.get(name.lower())
    if fmt is None:
        raise BlockFormatError(f"unknown block format {name!r} (supported: {', '.join(FORMATS)})")
    return fmt


def _half_bytes(v: torch.Tensor) -> torch.Tensor:
    return v.to(torch.float16).contiguous().view(torch.uint8).view(*v.shape[:-1], 2)


def _half_at(b: torch.Tensor, start: int) -> torch.Tensor:
    return b[..., start:start + 2].contiguous().view(torch.float16).float()  # [..., 1]


def _nibbles(q: torch.Tensor) -> torch.Tensor:
    """[..., 32] values 0..15 -> [..., 16] bytes: element j low nibble, element j + 16 high nibble."""
    q = q.to(torch.uint8)
    return q[..., :16] | (q[..., 16:] << 4)


def _unnibble(qs: torch.Tensor) -> torch.Tensor:
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1).float()


@torch.no_grad()
def quantize(weight: torch.Tensor, fmt: str | BlockFormat) -> torch.Tensor:
    """float [N, K] (K a multiple of 32) -> uint8 blocks [N, K/32 * block_bytes]."""
    f = fmt if isinstance(fmt, BlockFormat) else get_format(fmt)
    N, K = weight.shape
    if K % QK:
        raise BlockFormatError(f"block formats need in_features divisible by {QK}, got {K}")
    w = weight.detach().float().reshape(N, K // QK, QK)
    if f.name == "q8_0":
        d = w.abs().amax(-1, keepdim=True) / 127
        q = torch.where(d > 0, w / d.clamp_min(1e-30), 0).round().clamp(-127, 127).to(torch.int8)
        parts = [_half_bytes(d), q.view(torch.uint8)]
    elif f.name == "q4_0":
        idx = w.abs().argmax(-1, keepdim=True)
        d = w.gather(-1, idx) / -8
        q = (torch.where(d != 0, w / torch.where(d != 0, d, 1), 0) + 8.5).floor().clamp(0, 15)
        parts = [_half_bytes(d), _nibbles(q)]
    else:
        lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
        d = (hi - lo) / 15
        q = (torch.where(d > 0, (w - lo) / d.clamp_min(1e-30), 0) + 0.5).floor().clamp(0, 15)
        parts = [_half_bytes(d), _half_bytes(lo), _nibbles(q)]
    return torch.cat(parts, dim=-1).reshape(N, -1).contiguous()


def dequantize(blocks: torch.Tensor, fmt: str | BlockFormat) -> torch.Tensor:
    """uint8 blocks [N, nb * block_bytes] -> float32 [N, nb * 32]."""
    f = fmt if isinstance(fmt, BlockFormat) else get_format(fmt)
    N = blocks.shape[0]
    b = blocks.reshape(N, -1, f.block_bytes)
    d = _half_at(b, 0)
    if f.name == "q8_0":
        w = d * b[..., 2:].contiguous().view(torch.int8).float()
    elif f.name == "q4_0":
        w = d * (_unnibble(b[..., 2:]) - 8)
    else:
        w = d * _unnibble(b[..., 4:]) + _half_at(b, 2)
    return w.reshape(N, -1)


def check_blocks(blocks: torch.Tensor, fmt: str | BlockFormat, in_features: int, what: str) -> None:
    """Refuse blocks of the wrong size or with a NaN/inf scale, naming `what` (a tensor name)."""
    f = fmt if isinstance(fmt, BlockFormat) else get_format(fmt)
    nb = in_features // QK
    if blocks.dtype != torch.uint8 or blocks.dim() != 2 or blocks.shape[1] != nb * f.block_bytes:
        raise BlockFormatError(f"{what}: expected uint8 [rows, {nb * f.block_bytes}] {f.name} blocks for "
                               f"in_features={in_features}, got {blocks.dtype} {list(blocks.shape)}")
    b = blocks.reshape(blocks.shape[0], nb, f.block_bytes)
    for at in (0, 2) if f.name == "q4_1" else (0,):
        # a float16 is inf or NaN exactly when its 5 exponent bits (high byte, little-endian) are all set
        bad = (b[..., at + 1] & 0x7C) == 0x7C
        if bad.any():
            row, blk = (int(i) for i in bad.nonzero()[0])
            value = float(_half_at(b[row:row + 1, blk:blk + 1], at))
            raise BlockFormatError(f"{what}: corrupt {f.name} block (scale {value} in row {row}, block {blk}); "
                                   "the file is damaged")


def reference_matmul(x: torch.Tensor, blocks: torch.Tensor, fmt: str | BlockFormat) -> torch.Tensor:
    """x [M, K] @ dequantize(blocks)^T in float32: the pure-PyTorch path and the kernels' test reference."""
    return F.linear(x.float(), dequantize(blocks, fmt))
