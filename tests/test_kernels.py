"""omnimini's CPU kernels (omnimini.kernels) against float32 references, the block formats, the fallback path.

Error bounds (stated per format, asserted below):
- qlinear vs the same product with the activations rounded as the kernel rounds them (int8 per 32-block,
  d = max|x| / 127) and the dequantized weights, in float64: <= 1e-5 * (|xq| @ |W|^T) + one rounding flip
  (d_x * max|W|, float32 x * (127/max) can land on the other side of a .5 than x / d).
- qlinear vs float32 x @ W^T on the dequantized weights: <= sum over blocks of d_x / 2 * sum |W| (each
  activation moves by at most half its block's step) + the bound above.
- dequantize(quantize(w)) vs w, per block with step d: Q8_0 <= 0.57 d, Q4_1 <= 0.51 d + |min| * 2^-10
  (float16 scales), Q4_0 <= 1.01 |d| (the largest-magnitude value's opposite clamps at 15).
- Q4_K / Q6_K (read from GGUF files only): the same two qlinear bounds, on random valid super-blocks (gguf-py
  has no quantizer for them); their dequantization equals gguf.quants.dequantize bit for bit.
"""

import os

import numpy as np
import pytest
import torch

from omnimini import kernels
from omnimini.kernels import blocks as B

pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"kernels unavailable: {kernels._state.get('why')}")

SHAPES = [(37, 96), (70, 416), (16, 32), (5, 288)]  # N not a multiple of 16 rows, K not a multiple of 256
ROWS = [1, 2, 3, 4, 5, 8, 17, 32]


def _act_quant(x: torch.Tensor):
    """The kernel's activation rounding, in PyTorch: per 32-block int8 with d = max|x| / 127."""
    xb = x.reshape(x.shape[0], -1, 32)
    mx = xb.abs().amax(-1, keepdim=True)
    q = torch.where(mx > 0, xb * (127 / mx.clamp_min(1e-30)), 0).round()
    return (q * (mx / 127)).reshape(x.shape), (mx / 127).reshape(x.shape[0], -1)


def _check_qlinear(f, blocks, N, K, g, interleaved=False):
    wd = B.dequantize(blocks, f).double()
    packed = B.repack_x8(blocks, f) if interleaved else None
    for M in ROWS:
        x = torch.randn(M, K, generator=g) * 3
        x[0, :32] *= 50  # one outlier block: its scale must not leak into the others
        if interleaved:
            y = torch.ops.omnimini_cpu.qlinear(x, packed, f.code | B.X8, N)
        else:
            y = kernels.qlinear(x, blocks, f, N)
        assert y.shape == (M, N) and y.dtype == torch.float32
        xq, dx = _act_quant(x)
        exact = xq.double() @ wd.T
        flip = dx.amax(1, keepdim=True).double() * wd.abs().max()
        tight = 1e-5 * (xq.double().abs() @ wd.abs().T) + flip
        assert ((y.double() - exact).abs() <= tight).all(), (f.name, M, N, K)
        step = (dx.double()[:, :, None] / 2 * wd.abs().reshape(N, -1, 32).sum(-1).T[None]).sum(1)
        loose = step + tight
        assert ((y.double() - x.double() @ wd.T).abs() <= loose).all(), (f.name, M, N, K)


@pytest.mark.parametrize("fmt", list(B.FORMATS))
def test_qlinear_matches_float_reference(fmt):
    f = B.get_format(fmt)
    g = torch.Generator().manual_seed(0)
    for N, K in SHAPES:
        w = torch.randn(N, K, generator=g) * 0.05
        _check_qlinear(f, B.quantize(w, f), N, K, g)


@pytest.mark.parametrize("fmt", B.X8_FORMATS)
def test_interleaved_qlinear_matches_float_reference(fmt):
    """Rows interleaved by 8 (the form BlockLinear gives these formats): the same bounds, N not a multiple of 8."""
    f = B.get_format(fmt)
    g = torch.Generator().manual_seed(1)
    for N, K in SHAPES + [(8, 64), (1, 32)]:
        blocks = B.quantize(torch.randn(N, K, generator=g) * 0.05, f)
        packed = B.repack_x8(blocks, f)
        assert packed.shape == (-(-N // 8), blocks.shape[1] * 8)
        assert torch.equal(B.unpack_x8(packed, f, N), blocks)  # a byte permutation, nothing lost
        _check_qlinear(f, blocks, N, K, g, interleaved=True)
    with pytest.raises(B.BlockFormatError, match="q6_k has no interleaved form"):
        B.repack_x8(random_k_blocks("q6_k", 8, 256), "q6_k")


def test_block_linear_interleaves_once_and_saves_gguf_layout():
    from omnimini.model.blocklinear import BlockLinear

    lin = BlockLinear.from_float(torch.randn(20, 64), None, "q4_1")
    gguf_form = lin.blocks.clone()
    x = torch.randn(3, 64)
    with torch.no_grad():
        y = lin(x)
    assert lin.interleaved and lin.blocks.shape == (3, gguf_form.shape[1] * 8)  # replaced, not copied
    assert torch.equal(lin.state_dict()["blocks"], gguf_form)
    assert torch.equal(lin.gguf_rows(torch.tensor([19, 0, 8])), gguf_form[[19, 0, 8]])
    torch.testing.assert_close(y, kernels.qlinear(x, gguf_form, lin.format, 20), rtol=1e-5, atol=1e-5)
    fresh = BlockLinear.from_float(torch.randn(20, 64), None, "q4_1")
    lin.load_state_dict(fresh.state_dict())
    assert not lin.interleaved and torch.equal(lin.blocks, fresh.blocks)


def random_k_blocks(fmt: str, N: int, K: int, seed: int = 0) -> torch.Tensor:
    """Valid random Q4_K / Q6_K super-blocks: random bytes, with finite float16 scales where the format keeps
    them (random bytes there could be NaN/inf, which the loaders refuse)."""
    f = B.get_format(fmt)
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (N, K // f.block_size, f.block_bytes), dtype=np.uint8)
    for at in B._scale_offsets(f):
        scale = (rng.standard_normal((N, K // f.block_size, 1)) * 0.01).astype(np.float16)
        raw[..., at:at + 2] = scale.view(np.uint8)
    return torch.from_numpy(raw.reshape(N, -1))


K_SHAPES = [(37, 256), (70, 768), (16, 512), (5, 256)]  # N not a multiple of the 16-row chunk


@pytest.mark.parametrize("fmt", list(B.GGUF_ONLY))
def test_k_quant_qlinear_matches_float_reference(fmt):
    f = B.get_format(fmt)
    g = torch.Generator().manual_seed(3)
    for i, (N, K) in enumerate(K_SHAPES):
        _check_qlinear(f, random_k_blocks(fmt, N, K, seed=i), N, K, g)


@pytest.mark.parametrize("fmt", list(B.GGUF_ONLY))
def test_k_quant_dequantize_equals_gguf(fmt):
    from gguf import GGMLQuantizationType, quants

    blocks = random_k_blocks(fmt, 9, 768, seed=5)
    want = quants.dequantize(blocks.numpy(), GGMLQuantizationType[fmt.upper()])
    got = B.dequantize(blocks, fmt)
    assert got.shape == (9, 768) and np.array_equal(got.numpy(), want)


def test_k_quant_blocks_refused_where_they_cannot_be_used():
    from omnimini.model.blocklinear import BlockLinear

    blocks = random_k_blocks("q6_k", 4, 512)
    blocks[1, 210 + 208: 210 + 210] = torch.tensor([float("inf")], dtype=torch.float16).view(torch.uint8)
    with pytest.raises(B.BlockFormatError, match=r"blk\.0\.ffn_down\.weight: corrupt q6_k block .*row 1, block 1"):
        BlockLinear(blocks, "q6_k", 512, what="blk.0.ffn_down.weight")
    with pytest.raises(B.BlockFormatError, match="divisible by 256"):
        BlockLinear(random_k_blocks("q4_k", 4, 256)[:, :100], "q4_k", 100)
    with pytest.raises(B.BlockFormatError, match="read from GGUF files only"):
        B.quantize(torch.randn(4, 256), "q4_k")


@pytest.mark.parametrize("fmt", list(B.FORMATS))
def test_block_roundtrip_bounds(fmt):
    f = B.get_format(fmt)
    w = torch.randn(64, 320, generator=torch.Generator().manual_seed(1)) + 0.3
    w[3, :32] = 0  # an all-zero block stays zero
    got = B.dequantize(B.quantize(w, f), f)
    assert B.quantize(w, f).shape == (64, 10 * f.block_bytes)
    wb, gb = w.reshape(64, 10, 32), got.reshape(64, 10, 32)
    err = (gb - wb).abs().amax(-1)
    if fmt == "q8_0":
        bound = 0.57 * wb.abs().amax(-1) / 127
    elif fmt == "q4_1":
        lo, hi = wb.amin(-1), wb.amax(-1)
        bound = 0.51 * (hi - lo) / 15 + lo.abs() * 2 ** -10
    else:
        bound = 1.01 * wb.abs().amax(-1) / 8
    assert (err <= bound + 1e-7).all()
    assert torch.equal(gb[3, 0], torch.zeros(32))


def test_pointwise_ops_match_pytorch():
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(5, 200, generator=g), torch.randn(200, generator=g)
    torch.testing.assert_close(torch.ops.omnimini_cpu.rms_norm(x, w, 1e-5), F.rms_norm(x, (200,), w, 1e-5))
    gu = torch.randn(3, 2 * 77, generator=g) * 4  # 77: eight-wide steps and a scalar tail
    gu[0, :12] = torch.tensor([0.0, -0.0, 100.0, -100.0, 88.5, -88.5, 30.0, -30.0, 1e-8, -1e-8, 17.3, -17.3])
    got = torch.ops.omnimini_cpu.silu_mul(gu)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, F.silu(gu[:, :77]) * gu[:, 77:], rtol=1e-6, atol=1e-7)


def test_fake_kernels_give_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    f = B.get_format("q4_1")
    with FakeTensorMode():
        y = torch.ops.omnimini_cpu.qlinear(torch.empty(3, 64), torch.empty(10, 2 * f.block_bytes, dtype=torch.uint8),
                                           f.code, 10)
        a = torch.ops.omnimini_cpu.attn_decode(torch.empty(2, 8 * 16), torch.empty(2, 2, 9, 16),
                                               torch.empty(2, 2, 9, 16), torch.zeros(2, dtype=torch.long),
                                               torch.zeros(2, dtype=torch.long), torch.empty(2, 16),
                                               torch.empty(2, 16), 4, 2, 0.0, 0)
    assert y.shape == (3, 10) and a.shape == (2, 64)


def test_corrupt_block_named():
    from omnimini.model.blocklinear import BlockLinear

    blocks = B.quantize(torch.randn(4, 64), "q4_1")
    blocks[2, B.get_format("q4_1").block_bytes + 2: B.get_format("q4_1").block_bytes + 4] = \
        torch.tensor([float("nan")], dtype=torch.float16).view(torch.uint8)  # row 2, block 1: its min is NaN
    with pytest.raises(B.BlockFormatError, match=r"blk\.7\.ffn_up\.weight: corrupt q4_1 block .*row 2, block 1"):
        BlockLinear(blocks, "q4_1", 64, what="blk.7.ffn_up.weight")
    with pytest.raises(B.BlockFormatError, match="unknown block format 'q3_k'"):
        B.get_format("q3_k")


def test_fallback_when_disabled(monkeypatch):
    from omnimini.model.blocklinear import BlockLinear

    lin = BlockLinear.from_float(torch.randn(33, 64), torch.randn(33), "q4_0")
    x = torch.randn(2, 3, 64)
    with torch.no_grad():
        fast = lin(x)
    monkeypatch.setenv(kernels.DISABLE_ENV, "1")
    kernels.reset_for_tests()
    try:
        with pytest.warns(RuntimeWarning, match="OMNIMINI_NO_KERNELS is set; using the slower PyTorch path"):
            assert not kernels.available()
        with torch.no_grad():
            slow = lin(x)
        torch.testing.assert_close(slow, B.reference_matmul(x.reshape(6, 64), lin.gguf_blocks(), "q4_0").view(2, 3, 33)
                                   + lin.bias)
        assert (slow - fast).abs().max() < 0.02 * slow.abs().max()  # the kernel only rounds the activations
        k_lin = BlockLinear(random_k_blocks("q6_k", 7, 256), "q6_k", 256)
        xk = torch.randn(3, 256)
        with torch.no_grad():
            torch.testing.assert_close(k_lin(xk), xk @ B.dequantize(k_lin.gguf_blocks(), "q6_k").T)
    finally:
        monkeypatch.delenv(kernels.DISABLE_ENV)
        kernels.reset_for_tests()
    assert kernels.available() and os.environ.get(kernels.DISABLE_ENV) is None
