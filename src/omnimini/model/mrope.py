"""M-RoPE positions (Qwen2-VL): (temporal, height, width) rotary coordinates of every prompt token.

A text token's three coordinates are all its position. An image's tokens, laid out row-major over its merged
(frames, rows, columns) grid, all start from the position p the image begins at: temporal p + frame, height
p + row, width p + column; the text after it continues at p + max(rows, columns). So a prompt with images spans
fewer rotary positions than it has tokens, and the tokens generated after it are rotated by
cache position + delta (delta = the next rotary position - the prompt's length, negative after an image): the
KV cache keeps counting tokens, the rotation does not.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


def mrope_positions(ids: list[int], image_token_id: int,
                    grids: Iterator[tuple[int, int, int]]) -> tuple[torch.Tensor, int]:
    """([len(ids), 3] coordinates, next rotary position). Each image takes its grid from `grids` in order, at a
    run of t * h * w image tokens."""
    out = torch.empty(len(ids), 3, dtype=torch.long)
    pos, i, n = 0, 0, len(ids)
    while i < n:
        if ids[i] != image_token_id:
            j = i
            while j < n and ids[j] != image_token_id:
                j += 1
            out[i:j] = torch.arange(pos, pos + j - i)[:, None]
            pos += j - i
            i = j
            continue
        try:
            t, h, w = next(grids)
        except StopIteration:
            raise ValueError("the prompt has more images (runs of image tokens) than images were given") from None
        size = t * h * w
        if ids[i:i + size] != [image_token_id] * size:
            raise ValueError(f"an image of {t}x{h}x{w} tokens needs {size} consecutive image tokens in the prompt")
        tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
        out[i:i + size] = torch.stack([tt, hh, ww], dim=-1).reshape(size, 3) + pos
        pos += max(h, w)  # the next token's position: one past the image's largest coordinate (t = 1 for images)
        i += size
    return out, pos
