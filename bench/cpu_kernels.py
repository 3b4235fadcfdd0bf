"""The CPU matmul kernels a batch-1 decode step can be built on, measured on SmolLM2-135M's shapes.

    .venv/bin/python bench/cpu_kernels.py [--threads 2] [--rounds 5] [--no-llama-cpp]

Batch-1 decode reads every weight once per token, so its speed is set by how fast a kernel streams the weights
through a [1, in] x [in, out] product. For each kernel PyTorch (2.13, CPU) offers, this times one token's worth
of GEMVs: 30 layers of SmolLM2-135M's linears (fused qkv 960x576, o 576x576, fused gate/up 3072x576,
down 576x1536), every layer its *own* weights so nothing stays in cache, plus the 49152x576 output head. The
table gives ms per token, the weight bytes read, the effective GB/s, and the tok/s ceiling the kernel alone
allows (GEMVs only: no attention, norms or Python). Next to it: the machine's plain memory-read rate.

The kernels: float32 `F.linear` (MKL); fbgemm's dynamic int8 linear (the engine's `--quantize int8`: per-row
int8 weights, activations quantized on the fly); fbgemm's float16 linear (`--quantize fp16`); PyTorch's
weight-only int8 (`_weight_int8pack_mm`) and 4-bit (`_weight_int4pack_mm_for_cpu`, group 32, bfloat16
activations: its fast path) kernels; oneDNN's int8 linear (`onednn.qlinear_pointwise`). llama.cpp reads a
Q4_1 file (~5 bits a weight) with hand-written AVX2 kernels: its whole batch-1 decode (same machine, same run,
bench/peers.py's measurement) is the last column's yardstick.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
import torch.nn.functional as F

LAYERS = 30
SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # (out, in) of one layer's linears
HEAD = (49152, 576)


def read_rate(n: int = 100_000_000) -> float:
    """GB/s of a plain reduction over a float32 tensor far bigger than the caches."""
    a = torch.ones(n)
    a.sum()
    t = time.perf_counter()
    for _ in range(3):
        a.sum()
    return 3 * a.numel() * 4 / (time.perf_counter() - t) / 1e9


def _weights() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(o, i, generator=g) * 0.05 for _ in range(LAYERS) for o, i in SHAPES]
    return ws + [torch.randn(*HEAD, generator=g) * 0.05]


def fp32(ws):
    return [(w, w.numel() * 4) for w in ws], lambda x, w: F.linear(x, w)


def _int8_rows(w):
    from omnimini.engine.quant import int8_row_scales

    scale = int8_row_scales(w)
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def fbgemm_int8(ws):
    from omnimini.engine.quant import _packed_int8, int8_matmul

    return [(_packed_int8(w, None), w.numel()) for w in ws], int8_matmul


def fbgemm_fp16(ws):
    from omnimini.engine.quant import fp16_matmul

    return [(torch.ops.quantized.linear_prepack_fp16(w, None), w.numel() * 2) for w in ws], fp16_matmul


def weight_int8pack(ws):
    packs = [(_int8_rows(w), w.numel()) for w in ws]
    return packs, lambda x, p: torch.ops.aten._weight_int8pack_mm(x, p[0], p[1])


def weight_int4pack(ws, group: int = 32):
    packs = []
    for w in ws:
        o, i = w.shape
        wg = w.view(o, i // group, group)
        lo, hi = wg.amin(-1), wg.amax(-1)
        scale = ((hi - lo) / 15).clamp_min(1e-8)
        q = torch.round((wg - lo[..., None]) / scale[..., None]).clamp(0, 15).view(o, i).to(torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        # PyTorch's convention: w = (q - 8) * scale + zero, so zero = lo + 8 * scale
        sz = torch.stack([scale, lo + 8 * scale], -1).transpose(0, 1).contiguous().bfloat16()
        packs.append(((packed, sz), w.numel() // 2 + sz.numel() * 2))
    return packs, lambda x, p: torch.ops.aten._weight_int4pack_mm_for_cpu(x.bfloat16(), p[0], group, p[1])


def onednn_int8(ws):
    packs = []
    for w in ws:
        q, scale = _int8_rows(w)
        packs.append(((torch.ops.onednn.qlinear_prepack(q, [1, w.shape[1]]), scale.float(),
                       torch.zeros(w.shape[0], dtype=torch.int32)), w.numel()))

    def mm(x, p):
        a = x.abs().amax().clamp_min(1e-12) / 127  # symmetric per-tensor activation scale, uint8 with zero 128
        qx = (torch.round(x / a) + 128).clamp(0, 255).to(torch.uint8)
        return torch.ops.onednn.qlinear_pointwise.tensor(qx, a, torch.tensor(128, dtype=torch.int32), p[0], p[1],
                                                         p[2], None, 1.0, 0, torch.float32, "none", [], "")
    return packs, mm


KERNELS = {
    "float32 F.linear (MKL)": fp32,
    "fbgemm int8, dynamic activations (--quantize int8)": fbgemm_int8,
    "fbgemm float16 (--quantize fp16)": fbgemm_fp16,
    "aten._weight_int8pack_mm (weight-only int8)": weight_int8pack,
    "aten._weight_int4pack_mm_for_cpu (4-bit, group 32, bf16 act.)": weight_int4pack,
    "onednn.qlinear_pointwise (int8)": onednn_int8,
}


def check(ws, packs, mm) -> float:
    """Largest error of the kernel's output against float32, relative to the output's scale (layer 0's up)."""
    x = torch.randn(1, ws[2].shape[1], generator=torch.Generator().manual_seed(1))
    ref = F.linear(x, ws[2])
    return float((mm(x, packs[2][0]).float() - ref).abs().max() / ref.abs().max())


def time_token(packs, mm, ws, rounds: int) -> float:
    xs = {i: torch.randn(1, i) for _, i in SHAPES + [HEAD]}
    args = [(xs[w.shape[1]], p) for w, (p, _) in zip(ws, packs, strict=True)]
    best = float("inf")
    for _ in range(rounds + 1):  # the first round warms up
        t = time.perf_counter()
        for x, p in args:
            mm(x, p)
        best = min(best, time.perf_counter() - t)
    return best


def llama_cpp_decode(threads: int) -> float | None:
    """llama.cpp's batch-1 decode tok/s on the default model's GGUF (bench/peers.py's measurement)."""
    from peers import bench_llama_cpp

    from omnimini.weights.default import default_gguf

    r = bench_llama_cpp(default_gguf(), threads, HEAD[0])
    return r["decode1"] if r else None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5, help="timed tokens per kernel (the fastest is reported)")
    ap.add_argument("--no-llama-cpp", action="store_true", help="skip llama.cpp's decode (the last column)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")  # quantized-tensor deprecation notices
    ws = _weights()
    llama = None if args.no_llama_cpp else llama_cpp_decode(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads; memory read rate {read_rate():.1f} GB/s "
          f"(sum over a 400 MB float32 tensor); llama.cpp batch-1 decode "
          f"{f'{llama:.1f} tok/s' if llama else 'not measured'} (whole model, everything included)\n")
    print("| kernel | ms / token | MB read | GB/s | tok/s ceiling (GEMVs only) | ceiling / llama.cpp | rel. error |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    with torch.inference_mode():
        for name, build in KERNELS.items():
            try:
                packs, mm = build(ws)
                err = check(ws, packs, mm)
                dt = time_token(packs, mm, ws, args.rounds)
            except (RuntimeError, NotImplementedError) as e:  # a kernel this build lacks
                print(f"| {name} | unavailable: {str(e).splitlines()[0][:60]} | | | | | |")
                continue
            mb = sum(b for _, b in packs) / 1e6
            vs = f"{1 / dt / llama:.2f}x" if llama else "-"
            print(f"| {name} | {dt * 1e3:.1f} | {mb:.0f} | {mb / 1e3 / dt:.1f} | {1 / dt:.0f} | {vs} | {err:.3f} |")
            del packs


if __name__ == "__main__":
    main()
