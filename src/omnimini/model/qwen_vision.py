"""Qwen2-VL / Qwen2.5-VL vision tower: images at their own size, rotary patch positions, a patch merger.

Each image arrives as one normalised [3, H, W] tensor with H and W multiples of patch_size * merge (images.py
resizes it so). It is cut into patch_size patches, each patch repeated over `temporal_patch` frames (the tower is
a video tower; a still image is its own frames), and embedded by one linear map (the checkpoint's Conv3d: its
kernel covers exactly one patch, so it is a matrix over the flattened patch). There are no learned positions:
the attention rotates queries and keys by the patch's row (first half of each head's rotary frequencies) and
column (second half). Patches are kept in merge-block order: the merge x merge neighbours that become one LM token
are consecutive, so the merger (norm, then Linear-GELU-Linear over the merge^2 concatenated patches) reads them
as one row. Images never attend to each other, so each image runs through the blocks on its own.

Qwen2.5-VL adds window attention: outside `full_attention_layers`, a patch sees only the patches of its
window_size x window_size pixel window (transformers reorders patches window by window; masking the windows in
the image's own order computes the same attention).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from omnimini.config import VisionConfig
from omnimini.model.vision import ViTBlock, vision_norm


def patchify(image: torch.Tensor, patch: int, merge: int, frames: int) -> torch.Tensor:
    """[3, H, W] -> [patches, 3 * frames * patch * patch]: patches in merge-block order (each merge x merge block
    of the grid row-major, the blocks row-major), each patch's values as (channel, frame, row, column), as
    Qwen2-VL's image processor flattens them."""
    C, H, W = image.shape
    gh, gw = H // patch, W // patch
    x = image.reshape(C, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(1, 4, 2, 5, 0, 3, 6)  # block row, block col, row in block, col in block, C, p, p
    x = x[:, :, :, :, :, None].expand(*x.shape[:5], frames, patch, patch)
    return x.reshape(gh * gw, C * frames * patch * patch)


def patch_coords(gh: int, gw: int, merge: int) -> torch.Tensor:
    """[gh * gw, 2] (row, column) of each patch, in patchify's merge-block order."""
    rows = torch.arange(gh)[:, None].expand(gh, gw)
    cols = torch.arange(gw)[None, :].expand(gh, gw)
    block = (gh // merge, merge, gw // merge, merge)
    return torch.stack([t.reshape(block).transpose(1, 2).flatten() for t in (rows, cols)], dim=-1)


def image_grid(image: torch.Tensor, cfg: VisionConfig) -> tuple[int, int, int]:
    """(frames, rows, columns) of the image's LM tokens: the patch grid after merging."""
    _, H, W = image.shape
    s = cfg.patch_size * cfg.pixel_shuffle
    if H % s or W % s:
        raise ValueError(f"image of {H}x{W} px is not a multiple of patch_size x merge ({s}) on each side")
    return 1, H // s, W // s


class QwenVisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig, lm_hidden: int):
        super().__init__()
        self.cfg = cfg
        d, p, m = cfg.hidden_size, cfg.patch_size, cfg.pixel_shuffle
        self.patch_embed = nn.Linear(3 * cfg.temporal_patch * p * p, d, bias=False)
        self.blocks = nn.ModuleList(ViTBlock(cfg) for _ in range(cfg.num_layers))
        self.merge_norm = vision_norm(cfg, d)
        self.proj_fc1 = nn.Linear(d * m * m, d * m * m)
        self.proj_fc2 = nn.Linear(d * m * m, lm_hidden)

    def forward(self, images: list[torch.Tensor]) -> torch.Tensor:
        """Normalised [3, H, W] images -> their LM tokens, concatenated: [sum of rows * columns, lm_hidden]."""
        return torch.cat([self._encode(img) for img in images])

    def _rope(self, coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # computed per image (not a buffer): the model is built on the meta device and only loaded tensors arrive
        head = self.cfg.hidden_size // self.cfg.num_heads
        half = head // 2
        inv = 1.0 / (self.cfg.rope_theta ** (torch.arange(0, half, 2, dtype=torch.float) / half))
        freqs = (coords[..., None].float() * inv).flatten(1)  # [N, head/2]: the row's angles, then the column's
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos(), emb.sin()

    def _windows(self, gh: int, gw: int, coords: torch.Tensor) -> torch.Tensor | None:
        """[N, N] bool: patches in the same window_size window (None without window attention)."""
        if not self.cfg.window_size:
            return None
        side = self.cfg.window_size // self.cfg.patch_size  # window side in patches
        per_row = -(-gw // side)
        win = (coords[:, 0] // side) * per_row + coords[:, 1] // side
        return win[:, None] == win[None, :]

    def _encode(self, image: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        image_grid(image, cfg)  # checks the size
        gh, gw = image.shape[1] // cfg.patch_size, image.shape[2] // cfg.patch_size
        coords = patch_coords(gh, gw, cfg.pixel_shuffle).to(image.device)
        x = self.patch_embed(patchify(image, cfg.patch_size, cfg.pixel_shuffle, cfg.temporal_patch))[None]
        rope = tuple(t.to(image.device) for t in self._rope(coords))
        windows = self._windows(gh, gw, coords)
        for i, blk in enumerate(self.blocks):
            x = blk(x, rope, None if i in cfg.full_attention_layers else windows)
        x = self.merge_norm(x[0]).reshape(-1, cfg.hidden_size * cfg.pixel_shuffle ** 2)
        return self.proj_fc2(F.gelu(self.proj_fc1(x)))

    def token_count(self, images: list[torch.Tensor]) -> int:
        return sum(t * h * w for t, h, w in (image_grid(img, self.cfg) for img in images))
