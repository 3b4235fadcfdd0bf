"""A linear layer whose weight stays in a GGUF block format (Q8_0 / Q4_0 / Q4_1): ~4.5-8.5 bits per weight.

The forward runs omnimini's own CPU kernel (omnimini.kernels: activations quantized per 32-block to int8 inside
the op, integer dot products, threads over output rows) or, when the kernels are unavailable, the same product in
PyTorch on the dequantized weight. Training does not go through it (the blocks are not trainable); the engine and
evaluation do, through the model's ordinary forward.

Where the kernels run it, a Q8_0 / Q4_0 / Q4_1 weight is repacked on first use into the kernels' interleaved form
(rows in groups of 8: kernels/blocks.py repack_x8; 2.3-3x faster products, measured in bench/) and `blocks` then
holds that form instead of GGUF's: no second copy. `gguf_blocks()` gives GGUF's layout back; the state dict
always holds it.
"""

from __future__ import annotations

import torch
from torch import nn

from omnimini import kernels
from omnimini.kernels.blocks import (
    QK,
    X8,
    X8_FORMATS,
    check_blocks,
    dequantize,
    get_format,
    quantize,
    repack_x8,
    rows_x8,
    unpack_x8,
)


class BlockLinear(nn.Module):
    # bumped whenever any BlockLinear is made or its blocks change (repacked, loaded): OmniModel caches its fused
    # decode arguments per generation
    generation = 0

    def __init__(self, blocks: torch.Tensor, fmt: str, in_features: int, bias: torch.Tensor | None = None,
                 what: str = "weight"):
        super().__init__()
        self.format = get_format(fmt)
        check_blocks(blocks, self.format, in_features, what)
        self.in_features, self.out_features = in_features, blocks.shape[0]
        self.register_buffer("blocks", blocks.contiguous())
        self.interleaved = False  # True once `blocks` holds the kernels' x8 form
        BlockLinear.generation += 1
        self.bias = None if bias is None else bias.detach().float().clone()

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, fmt: str = "q8_0") -> BlockLinear:
        return cls(quantize(weight, fmt), fmt, weight.shape[1], bias)

    @staticmethod
    def fits(weight: torch.Tensor) -> bool:
        return weight.dim() == 2 and weight.shape[1] % QK == 0

    def gguf_blocks(self) -> torch.Tensor:
        return unpack_x8(self.blocks, self.format, self.out_features) if self.interleaved else self.blocks

    def gguf_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of the weight in GGUF's layout (embedding lookups of a tied head), unpacking only their groups."""
        return rows_x8(self.blocks, self.format, ids) if self.interleaved else self.blocks.index_select(0, ids)

    def kernel_weight(self) -> tuple[torch.Tensor, int]:
        """The weight and format code for torch.ops.omnimini_cpu (kernels available): interleaved where it can be."""
        if not self.interleaved and self.format.name in X8_FORMATS:
            self.blocks = repack_x8(self.blocks, self.format)
            self.interleaved = True
            BlockLinear.generation += 1
        return self.blocks, self.format.code | (X8 if self.interleaved else 0)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "blocks"] = self.gguf_blocks()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if self.interleaved:  # loading GGUF-layout blocks: the module's buffer must take that shape again
            self.blocks, self.interleaved = self.gguf_blocks(), False
        BlockLinear.generation += 1
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float()
        if kernels.available():
            y = torch.ops.omnimini_cpu.qlinear(x2, *self.kernel_weight(), self.out_features)
        else:
            y = kernels.qlinear(x2, self.gguf_blocks(), self.format, self.out_features)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.format.name} blocks"


class BlockEmbedding(nn.Module):
    """Token embeddings stored as blocks, usually the very tensor a tied BlockLinear head multiplies with (one
    copy in memory instead of a float32 table): a lookup dequantizes only the rows it reads."""

    def __init__(self, blocks: torch.Tensor, fmt: str, dim: int):
        super().__init__()
        self.format = get_format(fmt)
        check_blocks(blocks, self.format, dim, "embedding")
        self.num_embeddings, self.embedding_dim = blocks.shape[0], dim
        self.register_buffer("blocks", blocks)

    @classmethod
    def sharing(cls, head: BlockLinear) -> BlockEmbedding:
        emb = cls(head.gguf_blocks(), head.format.name, head.in_features)
        # the rows are read from the head itself, whatever form the kernels have given its blocks since
        del emb.blocks
        emb.head = [head]  # in a list: not a submodule (the head is the model's own, saved once)
        return emb

    def _rows(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head[0].gguf_rows(ids) if hasattr(self, "head") else self.blocks.index_select(0, ids)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = dequantize(self._rows(ids.reshape(-1)), self.format)
        return rows.view(*ids.shape, self.embedding_dim)

    @property
    def weight(self) -> torch.Tensor:
        """The whole table in float32 (allocated on each access: for code that needs the table itself)."""
        return dequantize(self.head[0].gguf_blocks() if hasattr(self, "head") else self.blocks, self.format)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.format.name} blocks"
