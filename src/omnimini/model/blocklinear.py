"""A linear layer whose weight stays in a GGUF block format (Q8_0 / Q4_0 / Q4_1): ~4.5-8.5 bits per weight.

The forward runs omnimini's own CPU kernel (omnimini.kernels: activations quantized per 32-block to int8 inside
the op, integer dot products, threads over output rows) or, when the kernels are unavailable, the same product in
PyTorch on the dequantized weight. Training does not go through it (the blocks are not trainable); the engine and
evaluation do, through the model's ordinary forward.
"""

from __future__ import annotations

import torch
from torch import nn

from omnimini import kernels
from omnimini.kernels.blocks import QK, check_blocks, dequantize, get_format, quantize


class BlockLinear(nn.Module):
    def __init__(self, blocks: torch.Tensor, fmt: str, in_features: int, bias: torch.Tensor | None = None,
                 what: str = "weight"):
        super().__init__()
        self.format = get_format(fmt)
        check_blocks(blocks, self.format, in_features, what)
        self.in_features, self.out_features = in_features, blocks.shape[0]
        self.register_buffer("blocks", blocks.contiguous())
        self.bias = None if bias is None else bias.detach().float().clone()

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, fmt: str = "q8_0") -> BlockLinear:
        return cls(quantize(weight, fmt), fmt, weight.shape[1], bias)

    @staticmethod
    def fits(weight: torch.Tensor) -> bool:
        return weight.dim() == 2 and weight.shape[1] % QK == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = kernels.qlinear(x.reshape(-1, shape[-1]).float(), self.blocks, self.format, self.out_features)
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
        return cls(head.blocks, head.format.name, head.in_features)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = dequantize(self.blocks.index_select(0, ids.reshape(-1)), self.format)
        return rows.view(*ids.shape, self.embedding_dim)

    @property
    def weight(self) -> torch.Tensor:
        """The whole table in float32 (allocated on each access: for code that needs the table itself)."""
        return dequantize(self.blocks, self.format)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.format.name} blocks"
