"""Weight-only int8 linears for fast CPU decode (fbgemm dynamic quantization, PyTorch's own kernels).

Batch-1 decode of a small model is bound by reading weights from memory, so int8 weights read ~4x fewer bytes
than float32 and fbgemm's dynamic int8 GEMM (activations quantized per call) runs near the memory bandwidth.
Weights get symmetric per-output-channel scales. PyTorch's weight-only "weight pack" matmuls do not pay on AVX2
CPUs (bench/cpu_kernels.py): int8 is 10x slower than fbgemm's; int4 (fast only with bfloat16 activations) is
compute-bound, slower than fbgemm's int8 although it reads 40% fewer bytes, and less accurate. So there is no
int4 path: asking for it is an error that says so.

Quantization rewrites the model in place for the engine: attention and MLP projections, MoE experts (through
`MoE.expert_fn`), shared experts and the LM head (a tied head gets its own quantized copy; the embedding table
stays float32 for lookups). SwiGLU's gate and up projections are fused into one matmul.

Block formats (q8_0 | q4_0 | q4_1, GGUF's own) run omnimini's own AVX2 kernels (model/blocklinear.py); weights
that were read from a GGUF file already in one of these formats keep their blocks as they are (`native`), the
rest are quantized from float. The output head is Q8_0 for the 4-bit formats, as GGUF files usually keep it.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from omnimini import kernels
from omnimini.config import QUANTIZE_MODES
from omnimini.kernels.blocks import FORMATS, check_blocks
from omnimini.model.blocklinear import BlockEmbedding, BlockLinear
from omnimini.model.layers import ACTIVATION_FNS, Attention, SwiGLU
from omnimini.model.moe import MoE

BLOCK_MODES = tuple(FORMATS)
MODES = QUANTIZE_MODES
assert set(BLOCK_MODES) <= set(MODES)


class QuantizeError(ValueError):
    """A quantization mode or device this engine cannot run."""


def int8_row_scales(w: torch.Tensor) -> torch.Tensor:
    """Symmetric per-output-row int8 scales of a float [out, in] weight: row max |w| maps to 127."""
    return (w.abs().amax(dim=1) / 127.0).clamp_min(1e-8)


def _packed_int8(weight: torch.Tensor, bias: torch.Tensor | None):
    w = weight.detach().float().contiguous()
    scale = int8_row_scales(w).double()
    zero = torch.zeros(w.shape[0], dtype=torch.long)
    with warnings.catch_warnings():  # quantized-tensor constructors warn about a future deprecation
        warnings.simplefilter("ignore")
        wq = torch.quantize_per_channel(w, scale, zero, 0, torch.qint8)
        return torch.ops.quantized.linear_prepack(wq, None if bias is None else bias.detach().float())


# Passing fbgemm's packed weights (a TorchScript object) to a torch.ops call makes the Python binding probe it for
# `__torch_function__`; the lookup fails through a C++ exception, ~20 us a call (121 calls per token, more than the
# int8 GEMV itself). Nothing here needs torch-function overrides, so the probe is switched off around the call.
_NO_TORCH_FUNCTION = torch._C.DisableTorchFunction


def int8_matmul(x2: torch.Tensor, packed) -> torch.Tensor:
    """[N, in] float32 @ fbgemm-packed int8 weights; activations quantized per row (see Int8Linear)."""
    # reduce_range=True: 7-bit activations keep AVX2's int16 pairwise accumulation from saturating
    with _NO_TORCH_FUNCTION():
        if x2.shape[0] == 1:
            return torch.ops.quantized.linear_dynamic(x2, packed, True)
        a = x2.abs().amax(-1, keepdim=True).clamp_min(1e-12)
        return torch.ops.quantized.linear_dynamic(x2 / a, packed, True) * a


def fp16_matmul(x2: torch.Tensor, packed) -> torch.Tensor:
    with _NO_TORCH_FUNCTION():
        return torch.ops.quantized.linear_dynamic_fp16(x2, packed)


class PackedLinear(nn.Module):
    """y = x W^T (+ b) with W prepacked for one of fbgemm's CPU GEMMs; subclasses pick the format."""

    kind = ""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self._packed = self.pack(weight)
        self.bias = None if bias is None else bias.detach().float().clone()

    @staticmethod
    def pack(weight: torch.Tensor):
        raise NotImplementedError

    @staticmethod
    def matmul(x2: torch.Tensor, packed) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = self.matmul(x.reshape(-1, shape[-1]).float(), self._packed)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.kind}"

    @classmethod
    def from_linear(cls, lin: nn.Linear):
        return cls(lin.weight, lin.bias)


class Int8Linear(PackedLinear):
    """W stored int8 (per-row scales) in fbgemm's prepacked layout.

    fbgemm quantizes the activations per call (per tensor); rows are first scaled to a common range so that
    one token with large activations does not wipe out the precision of the others (per-token quantization).
    """

    kind = "int8 per-channel"
    pack = staticmethod(lambda weight: _packed_int8(weight, None))
    matmul = staticmethod(int8_matmul)


class Fp16Linear(PackedLinear):
    """fbgemm's packed float16-weight GEMM (float32 activations and accumulation): half the bytes of float32,
    numerically ~2e-4 relative error, so greedy outputs do not move."""

    kind = "fp16 weights"
    pack = staticmethod(lambda weight: torch.ops.quantized.linear_prepack_fp16(weight.detach().float().contiguous()))
    matmul = staticmethod(fp16_matmul)


class BlockLinears:
    """Makes BlockLinear modules in one format. `native` maps a float weight's data_ptr to the blocks it was read
    from (format, uint8 blocks, tensor name): those are used as they are, fused by concatenating rows when every
    part is in the same format; anything else is quantized from its float values."""

    def __init__(self, fmt: str, native: dict | None = None):
        self.fmt, self.native = fmt, native or {}

    def __call__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, fmt: str | None = None):
        return self.fuse([weight], bias, fmt)

    def fuse(self, parts: list[torch.Tensor], bias: torch.Tensor | None = None, fmt: str | None = None):
        found = [self.native.get(p.data_ptr()) for p in parts]
        if all(found) and len({f for f, _, _ in found}) == 1:
            for kind, blocks, name in found:  # each part on its own, so an error names the file's tensor
                check_blocks(blocks, kind, parts[0].shape[1], name)
            return BlockLinear(torch.cat([b for _, b, _ in found]), found[0][0], parts[0].shape[1], bias,
                               what=" + ".join(n for _, _, n in found))
        weight = torch.cat(parts) if len(parts) > 1 else parts[0]
        if not BlockLinear.fits(weight):  # in_features not a multiple of 32: stays a float matmul
            lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
            lin.weight.data, lin.bias = weight.detach().float(), None if bias is None else nn.Parameter(bias)
            return lin
        return BlockLinear.from_float(weight, bias, fmt or self.fmt)


def fused_linear(linear, parts: list[torch.Tensor], bias: torch.Tensor | None = None):
    """One quantized linear over the concatenated rows of `parts` (q/k/v, gate/up)."""
    if isinstance(linear, BlockLinears):
        return linear.fuse(parts, bias)
    return linear(torch.cat(parts), bias)


class QuantSwiGLU(nn.Module):
    """SwiGLU with gate and up fused into one quantized matmul (one weight read, one call)."""

    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, linear=Int8Linear,
                 act: str = "silu"):
        super().__init__()
        self.inter = gate.shape[0]
        self.gate_up = fused_linear(linear, [gate, up])
        self.down_proj = linear(down)
        self.act_name, self.act = act, ACTIVATION_FNS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gu = self.gate_up(x)
        if self.act_name == "silu" and kernels.usable(gu):  # one pass instead of slice, silu, slice, mul
            return self.down_proj(torch.ops.omnimini_cpu.silu_mul(gu.reshape(-1, 2 * self.inter)).view(
                *gu.shape[:-1], self.inter))
        return self.down_proj(self.act(gu[..., : self.inter]) * gu[..., self.inter:])

    @classmethod
    def from_swiglu(cls, m: SwiGLU, linear=Int8Linear) -> QuantSwiGLU:
        return cls(m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight, linear, m.act_name)


class QuantExperts(nn.Module):
    """Per-expert quantized SwiGLUs, called by MoE.dispatch through `expert_fn(e, h)`."""

    def __init__(self, moe: MoE, linear=Int8Linear):
        super().__init__()
        inter = moe.cfg.expert_intermediate
        self.experts = nn.ModuleList(QuantSwiGLU(moe.gate_up[e, :inter], moe.gate_up[e, inter:], moe.down[e], linear)
                                     for e in range(moe.cfg.num_experts))

    def forward(self, e: int, h: torch.Tensor) -> torch.Tensor:
        return self.experts[e](h)


LINEARS = {"int8": Int8Linear, "fp16": Fp16Linear}


def _quantize_attention(attn: Attention, linear) -> None:
    projs = [attn.q_proj, attn.k_proj, attn.v_proj]
    bias = None if projs[0].bias is None else torch.cat([p.bias for p in projs])
    attn.qkv = fused_linear(linear, [p.weight for p in projs], bias)  # one fused matmul per layer
    attn.q_proj = attn.k_proj = attn.v_proj = None
    attn.o_proj = linear(attn.o_proj.weight, attn.o_proj.bias)


def _quantize_moe(moe: MoE, linear) -> None:
    moe.quant_experts = QuantExperts(moe, linear)
    moe.expert_fn = moe.quant_experts
    # the float experts are no longer read: drop them so quantization also saves memory
    moe.gate_up = nn.Parameter(moe.gate_up.new_empty(0), requires_grad=False)
    moe.down = nn.Parameter(moe.down.new_empty(0), requires_grad=False)
    if moe.shared is not None:
        moe.shared = QuantSwiGLU.from_swiglu(moe.shared, linear)


@torch.no_grad()
def quantize_model(model, mode: str = "int8", calib_ids: list[int] | None = None, native: dict | None = None):
    """Quantize `model` in place for CPU inference; returns it. mode: q8_0 | q4_0 | q4_1 | int8 | fp16 | none
    (int4: see module doc). int8 with `calib_ids` (tokens of ordinary text) first moves activation outliers into
    the weights (smooth.py). `native` (block modes): weights already in a block format, see BlockLinears."""
    if mode == "auto":  # no GGUF blocks to keep here (runtime.resolve_quantize): the accurate packed format
        mode = "fp16"
    if mode not in MODES:
        raise QuantizeError(f"unknown quantization mode {mode!r} (choose one of: {', '.join(MODES)})")
    if mode == "none":
        return model
    if mode == "int4":
        raise QuantizeError("int4 is not offered: PyTorch's CPU int4 matmul (_weight_int4pack_mm_for_cpu) is "
                            "compute-bound on AVX2, slower than the int8 path and less accurate "
                            "(bench/cpu_kernels.py); use --quantize int8 or fp16")
    if next(model.parameters()).device.type != "cpu":
        raise QuantizeError(f"{mode} quantization uses fbgemm CPU kernels: load the model on cpu (on GPU use bf16)")
    if model.training:
        raise QuantizeError("quantize_model is for inference; call model.eval() first")
    if mode in BLOCK_MODES:
        kernels.available()  # build (or load) the kernels now, while loading, not inside the first request
    linear = BlockLinears(mode, native) if mode in BLOCK_MODES else LINEARS[mode]
    if mode == "int8" and calib_ids:
        from omnimini.engine.smooth import smooth_model

        smooth_model(model, calib_ids)
    for blk in model.blocks:
        _quantize_attention(blk.attn, linear)
        if isinstance(blk.mlp, MoE):
            _quantize_moe(blk.mlp, linear)
        else:
            blk.mlp = QuantSwiGLU.from_swiglu(blk.mlp, linear)
    head = model.embed.weight if model.lm_head is None else model.lm_head.weight
    # OmniModel.output_head calls lm_head whenever it is set, tied or not
    tied = model.lm_head is None
    model.lm_head = linear(head, fmt="q8_0") if isinstance(linear, BlockLinears) else linear(head)
    if tied and isinstance(model.lm_head, BlockLinear):  # lookups read the head's blocks: no float32 table
        model.embed = BlockEmbedding.sharing(model.lm_head)
    if mode in BLOCK_MODES and kernels.available():  # the kernels' interleaved form now, not in the first request
        for m in model.modules():
            if isinstance(m, BlockLinear):
                m.kernel_weight()
    model.quantization = mode
    return model


@torch.inference_mode()
def perplexity(model, ids: list[int], window: int = 512, max_tokens: int | None = None) -> float:
    """Perplexity over consecutive non-overlapping windows of `ids` (every token after a window's first)."""
    ids = ids[:max_tokens] if max_tokens else ids
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = torch.tensor(ids[start:start + window + 1])[None]
        if chunk.shape[1] < 2:
            break
        logits = model(chunk[:, :-1]).logits.float()
        nll += F.cross_entropy(logits[0], chunk[0, 1:], reduction="sum").item()
        count += chunk.shape[1] - 1
    return float(torch.tensor(nll / count).exp())
