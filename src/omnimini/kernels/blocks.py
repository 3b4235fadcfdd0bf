"""GGUF block formats in PyTorch: quantize float weights into blocks, dequantize blocks, the reference matmul.

A weight [N, K] in a block format is a uint8 tensor [N, K/block_size * block_bytes], each row its blocks in
GGUF's byte layout (see csrc/qlinear.cpp), so blocks read from a GGUF file are used as they are.
Quantization follows ggml's rounding: Q8_0 d = max|w| / 127; Q4_0 d = w_maxabs / -8 (signed), q = w/d + 8
clamped to 0..15; Q4_1 d = (max - min) / 15, m = min, q = (w - m) / d rounded. Scales are stored as float16.

Q4_K and Q6_K (llama.cpp's "k-quants", super-blocks of 256 weights) are only read from GGUF files, never made
here (ggml's k-quant rounding searches scales iteratively; omnimini's --quantize offers the 32-blocks):
  Q4_K (144 bytes): fp16 d, fp16 dmin, 12 bytes of eight 6-bit (scale, min) pairs, 128 bytes of nibbles;
       sub-block j of 32 weights: w = d * sc_j * q - dmin * m_j.
  Q6_K (210 bytes): 128 bytes low nibbles ql, 64 bytes of 2-bit high parts qh, int8 scales[16], fp16 d;
       w = d * scales[i / 16] * (q - 32), q 6 bits.
Q5_0 (22 bytes, 32 weights; llama.cpp's quantizers put it on some tensors of Q4_K_M / Q5 files) is read-only too:
  fp16 d, uint32 qh (bit j: the fifth bit of weight j), 16 bytes of nibbles; w = d * (q - 16).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

QK = 32
QK_K = 256  # the k-quants' super-block


@dataclass(frozen=True)
class BlockFormat:
    name: str  # the --quantize spelling, GGUF's type name upper-cased
    code: int  # the kernel's format number (csrc/qlinear.cpp: enum Format)
    block_bytes: int
    bits_per_weight: float
    block_size: int = QK  # weights per block


# formats omnimini can also quantize float weights into (--quantize)
FORMATS = {f.name: f for f in (BlockFormat("q8_0", 0, 34, 8.5), BlockFormat("q4_0", 1, 18, 4.5),
                               BlockFormat("q4_1", 2, 20, 5.0))}
# formats read from GGUF files only: the kernels run them, quantize() does not make them
GGUF_ONLY = {f.name: f for f in (BlockFormat("q4_k", 3, 144, 4.5, QK_K), BlockFormat("q6_k", 4, 210, 6.5625, QK_K),
                                 BlockFormat("q5_0", 5, 22, 5.5))}
ALL_FORMATS = {**FORMATS, **GGUF_ONLY}


class BlockFormatError(ValueError):
    """An unknown block format, or weights whose blocks cannot be used (wrong size, NaN/inf scales)."""


def get_format(name: str) -> BlockFormat:
    fmt = ALL_FORMATS.get(name.lower())
    if fmt is None:
        raise BlockFormatError(f"unknown block format {name!r} (supported: {', '.join(ALL_FORMATS)})")
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
    if f.name not in FORMATS:
        raise BlockFormatError(f"{f.name} blocks are read from GGUF files only; omnimini quantizes into "
                               f"{', '.join(FORMATS)}")
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
    if f.name == "q4_k":
        return _dequantize_q4_k(b).reshape(N, -1)
    if f.name == "q6_k":
        return _dequantize_q6_k(b).reshape(N, -1)
    d = _half_at(b, 0)
    if f.name == "q8_0":
        w = d * b[..., 2:].contiguous().view(torch.int8).float()
    elif f.name == "q4_0":
        w = d * (_unnibble(b[..., 2:]) - 8)
    elif f.name == "q5_0":
        qh = b[..., 2:6].to(torch.int64)
        qh = qh[..., 0] | qh[..., 1] << 8 | qh[..., 2] << 16 | qh[..., 3] << 24  # little-endian uint32
        high = (qh[..., None] >> torch.arange(32)) & 1
        w = d * ((_unnibble(b[..., 6:]) + 16 * high) - 16)
    else:
        w = d * _unnibble(b[..., 4:]) + _half_at(b, 2)
    return w.reshape(N, -1)


# The kernels' interleaved form of the 32-blocks (csrc/qlinear.cpp tile_x8): rows in groups of 8, per activation
# block the 8 rows' fp16 scales (Q4_1: then their 8 mins) and their weights as 32-byte vectors of 4 bytes per row.
# A byte permutation of GGUF's layout, made once at load; the format code passed to the kernel gets X8 added.
X8 = 16
X8_FORMATS = ("q8_0", "q4_0", "q4_1")


def _x8_split(f: BlockFormat) -> int:
    return 4 if f.name == "q4_1" else 2  # bytes of fp16 scales at a block's start


def repack_x8(blocks: torch.Tensor, fmt: str | BlockFormat) -> torch.Tensor:
    """uint8 blocks [N, nb * block_bytes] -> [ceil(N / 8), nb * 8 * block_bytes] (rows padded with zero blocks)."""
    f = fmt if isinstance(fmt, BlockFormat) else get_format(fmt)
    if f.name not in X8_FORMATS:
        raise BlockFormatError(f"{f.name} has no interleaved form (only {', '.join(X8_FORMATS)})")
    N, G, sb = blocks.shape[0], -(-blocks.shape[0] // 8), _x8_split(f)
    b = F.pad(blocks, (0, 0, 0, 8 * G - N)).view(G, 8, -1, f.block_bytes).transpose(1, 2)  # [G, nb, 8, bytes]
    nb = b.shape[1]
    scales = b[..., :sb].reshape(G, nb, 8, sb // 2, 2).permute(0, 1, 3, 2, 4).reshape(G, nb, 8 * sb)
    weights = b[..., sb:].reshape(G, nb, 8, -1, 4).transpose(2, 3).reshape(G, nb, -1)
    return torch.cat([scales, weights], -1).reshape(G, -1).contiguous()


@functools.lru_cache(maxsize=64)
def _x8_offsets(name: str, row_bytes: int) -> torch.Tensor:
    """[8, row_bytes]: where byte j of row r sits in its group's interleaved bytes (repack_x8 run on positions)."""
    where = repack_x8(torch.arange(8 * row_bytes).view(8, row_bytes), name).view(-1)
    inverse = torch.empty_like(where)
    inverse[where] = torch.arange(where.numel())
    return inverse.view(8, row_bytes)


def rows_x8(packed: torch.Tensor, fmt: str | BlockFormat, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` [n] of an interleaved weight in GGUF's layout, reading only their bytes (embedding lookups)."""
    f = fmt if isinstance(fmt, BlockFormat) else get_format(fmt)
    row_bytes = packed.shape[1] // 8
    at = (ids // 8 * packed.shape[1])[:, None] + _x8_offsets(f.name, row_bytes)[ids % 8]
    return packed.view(-1)[at]


def unpack_x8(packed: torch.Tensor, fmt: str | BlockFormat, rows: int) -> torch.Tensor:
    """The inverse of repack_x8: the first `rows` rows in GGUF's layout."""
    f = fmt if isinstance(fmt, BlockFormat) else get_format(fmt)
    G, sb = packed.shape[0], _x8_split(f)
    p = packed.view(G, -1, 8 * f.block_bytes)
    nb = p.shape[1]
    scales = p[..., :8 * sb].reshape(G, nb, sb // 2, 8, 2).permute(0, 1, 3, 2, 4).reshape(G, nb, 8, sb)
    weights = p[..., 8 * sb:].reshape(G, nb, -1, 8, 4).transpose(2, 3).reshape(G, nb, 8, -1)
    b = torch.cat([scales, weights], -1).transpose(1, 2).reshape(8 * G, -1)
    return b[:rows].contiguous()


def q4_k_scales(sc12: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K's 12 scale bytes [..., 12] -> 6-bit scales and mins [..., 8] (llama.cpp's get_scale_min_k4): pairs
    0..3 sit in the low 6 bits of bytes 0..3 (scales) and 4..7 (mins); pairs 4..7 take their low 4 bits from the
    nibbles of bytes 8..11 and their top 2 bits from the top bits of bytes 0..3 / 4..7."""
    sc12 = sc12.to(torch.int32)
    lo_s, lo_m, mix = sc12[..., 0:4], sc12[..., 4:8], sc12[..., 8:12]
    scale = torch.cat([lo_s & 63, (mix & 0x0F) | ((lo_s >> 6) << 4)], -1)
    mins = torch.cat([lo_m & 63, (mix >> 4) | ((lo_m >> 6) << 4)], -1)
    return scale, mins


def _dequantize_q4_k(b: torch.Tensor) -> torch.Tensor:
    d, dmin = _half_at(b, 0), _half_at(b, 2)  # [N, nsb, 1]
    scale, mins = q4_k_scales(b[..., 4:16])
    qs = b[..., 16:144].reshape(*b.shape[:-1], 4, 1, 32)
    # 32 bytes per 64 weights: the low nibbles are sub-block 2c, the high nibbles sub-block 2c + 1
    q = torch.cat([qs & 0x0F, qs >> 4], -2).reshape(*b.shape[:-1], 8, 32).float()
    # the products in ggml's order ((d * sc) * q - dmin * m, float32), so the values equal gguf's bit for bit
    return ((d * scale.float())[..., None] * q - (dmin * mins.float())[..., None]).reshape(*b.shape[:-1], QK_K)


def _dequantize_q6_k(b: torch.Tensor) -> torch.Tensor:
    lead = b.shape[:-1]
    ql = b[..., 0:128].reshape(*lead, 2, 1, 64)
    qh = b[..., 128:192].reshape(*lead, 2, 1, 32).to(torch.int32)
    scales = b[..., 192:208].contiguous().view(torch.int8).float()  # [..., 16]
    d = _half_at(b, 208)
    # per half of 128 weights, groups of 32: ql[0:32] low, ql[32:64] low, ql[0:32] high, ql[32:64] high nibbles,
    # each with the 2-bit pair of qh at shift 0, 2, 4, 6
    low = torch.cat([ql & 0x0F, ql >> 4], -2).reshape(*lead, 2, 4, 32).to(torch.int32)
    high = (qh >> torch.tensor([0, 2, 4, 6], dtype=torch.int32).view(4, 1)) & 3
    q = ((low | (high << 4)) - 32).reshape(*lead, 16, 16).float()
    return ((d * scales)[..., None] * q).reshape(*lead, QK_K)


def _scale_offsets(f: BlockFormat) -> tuple[int, ...]:
    """Where a block's float16 scales sit (bytes from the block's start)."""
    return {"q4_1": (0, 2), "q4_k": (0, 2), "q6_k": (208,)}.get(f.name, (0,))


def check_blocks(blocks: torch.Tensor, fmt: str | BlockFormat, in_features: int, what: str) -> None:
    """Refuse blocks of the wrong size or with a NaN/inf scale, naming `what` (a tensor name)."""
    f = fmt if isinstance(fmt, BlockFormat) else get_format(fmt)
    if in_features % f.block_size:
        raise BlockFormatError(f"{what}: {f.name} blocks need in_features divisible by {f.block_size}, "
                               f"got {in_features}")
    nb = in_features // f.block_size
    if blocks.dtype != torch.uint8 or blocks.dim() != 2 or blocks.shape[1] != nb * f.block_bytes:
        raise BlockFormatError(f"{what}: expected uint8 [rows, {nb * f.block_bytes}] {f.name} blocks for "
                               f"in_features={in_features}, got {blocks.dtype} {list(blocks.shape)}")
    b = blocks.reshape(blocks.shape[0], nb, f.block_bytes)
    for at in _scale_offsets(f):
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
