"""Dense per-token targets for the vision warm-up: what each image token's cell shows, read off the generator.

The vision encoder turns an image into a G x G grid of tokens. Each token gets labels for its cell: the object
whose centre lies there (colour, shape, size, where in the cell), the receptacle under the cell's centre, whether
a wall crosses it; and the image gets its object count. The facts live in individual tokens (a head on their mean
learns nothing: measured), so the heads read each token, and the encoder learns to put every fact where it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from omnimini.data.scenes.world import PALETTE, RECEPTACLE_KINDS, SHAPES

COLOURS = list(PALETTE)
MAX_COUNT = 8
# The word a cell's token should start out as: a frozen LM reads its own word embeddings from the first step,
# while a learned projection it has never seen starts as noise to it. (Colour first: what questions ask most.)
WORDS = ["empty", *COLOURS, *RECEPTACLE_KINDS, "wall"]


@dataclass
class CellObject:
    colour: str
    shape: str
    size: str  # "small" | "large"
    x: float
    y: float
    r: float


def scene_objects(scene) -> list[CellObject]:
    return [CellObject(o.colour, o.shape, o.size, o.x, o.y, o.radius) for o in scene.visible_objects()]


def shapes_objects(shapes) -> list[CellObject]:
    return [CellObject(s.colour, s.shape, s.size, s.x, s.y, s.r) for s in shapes]


def dense_targets(objects: list[CellObject], grid: int, scene=None) -> dict[str, torch.Tensor]:
    """Labels for one image: per cell (row-major, grid*grid) and for the whole image. 0 means "nothing"."""
    n = grid * grid
    colour = torch.zeros(n, dtype=torch.long)
    shape = torch.zeros(n, dtype=torch.long)
    size = torch.zeros(n, dtype=torch.long)
    offset = torch.full((n, 2), -1.0)  # -1: no object (masked out of the loss)
    # A cell shows the object that covers most of it (sampled on an 8 x 8 grid of points, at least 1/16 of the
    # cell): a label on the cell holding the object's centre alone was not learned in 350 steps (object-cell colour
    # 0.1), since the cells around it show the same colour and were labelled "nothing".
    k = 8
    fr = (torch.arange(k) + 0.5) / k
    cover = torch.zeros(n, len(objects))
    for c in range(n):
        px = (c % grid + fr[None, :]) / grid
        py = (c // grid + fr[:, None]) / grid
        for j, o in enumerate(objects):
            cover[c, j] = (((px - o.x) ** 2 + (py - o.y) ** 2) < (0.85 * o.r) ** 2).float().mean()
    for c in range(n):
        if not objects or cover[c].max() < 1 / 16:
            continue
        o = objects[int(cover[c].argmax())]
        colour[c] = COLOURS.index(o.colour) + 1
        shape[c] = SHAPES.index(o.shape) + 1
        size[c] = 1 if o.size == "small" else 2
    for o in objects:  # where in its cell the object's centre lies: for pointing
        col, row = min(grid - 1, int(o.x * grid)), min(grid - 1, int(o.y * grid))
        offset[row * grid + col] = torch.tensor([o.x * grid - col, o.y * grid - row])
    receptacle = torch.zeros(n, dtype=torch.long)
    wall = torch.zeros(n, dtype=torch.long)
    if scene is not None:
        for c in range(n):
            x0, y0 = (c % grid) / grid, (c // grid) / grid
            cx, cy = x0 + 0.5 / grid, y0 + 0.5 / grid
            for rc in scene.receptacles:
                if rc.contains(cx, cy):
                    receptacle[c] = RECEPTACLE_KINDS.index(rc.kind) + 1 + (3 if not rc.is_open else 0)
            x1, y1 = x0 + 1 / grid, y0 + 1 / grid
            wall[c] = int(any(w.x0 < x1 and x0 < w.x1 and w.y0 < y1 and y0 < w.y1 for w in scene.walls))
    word = torch.where(colour > 0, colour, torch.zeros_like(colour))
    rec_word = torch.where(receptacle > 0, 1 + len(COLOURS) + (receptacle - 1) % len(RECEPTACLE_KINDS), 0)
    word = torch.where(word == 0, rec_word, word)
    word = torch.where((word == 0) & (wall > 0), torch.full_like(word, len(WORDS) - 1), word)
    return {"colour": colour, "shape": shape, "size": size, "offset": offset, "receptacle": receptacle,
            "wall": wall, "word": word, "count": torch.tensor(min(len(objects), MAX_COUNT))}


CLASSES = {"colour": len(COLOURS) + 1, "shape": len(SHAPES) + 1, "size": 3,
           "receptacle": 2 * len(RECEPTACLE_KINDS) + 1, "wall": 2}


class DenseHeads(nn.Module):
    """Linear read-outs of each image token (cell facts) and of all tokens together (the count)."""

    def __init__(self, width: int, tokens: int, word_embeds: torch.Tensor | None = None, token_norm: bool = False):
        super().__init__()
        # token_norm: the heads read each token at unit RMS. Linear heads on tokens at an LM's embedding scale
        # learn at a rate set by that scale (Adam moves a weight by ~lr a step, a logit moves by that times the
        # token's size): the nano LM's 0.02 left colour at chance after 600 warm-up steps. omnimini-vl (0.136)
        # was trained without it.
        self.token_norm = token_norm
        # [len(WORDS), width]: the LM's embeddings of WORDS; each token is pulled towards its cell's word
        self.register_buffer("word_embeds", word_embeds, persistent=False)
        self.cell = nn.ModuleDict({k: nn.Linear(width, n) for k, n in CLASSES.items()})
        self.offset = nn.Linear(width, 2)
        self.count = nn.Linear(width * tokens, MAX_COUNT + 1)

    def forward(self, tokens: torch.Tensor, targets: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        """tokens [B, N, D] (projector output), targets stacked [B, N] / [B] -> (loss, accuracies)."""
        ce = nn.functional.cross_entropy
        loss, acc = 0.0, {}
        raw = tokens  # the word pull compares directions: scale-free either way
        if self.token_norm:
            tokens = F.rms_norm(tokens, tokens.shape[-1:])
        for k, head in self.cell.items():
            logits = head(tokens)
            loss = loss + ce(logits.flatten(0, 1), targets[k].flatten())
            acc[k] = (logits.argmax(-1) == targets[k]).float().mean().item()
            if k == "colour":  # the informative part: cells that hold an object
                has = targets[k] > 0
                acc["colour_obj"] = (logits.argmax(-1)[has] == targets[k][has]).float().mean().item()
        has = targets["offset"][..., 0] >= 0
        if has.any():
            loss = loss + 4 * nn.functional.mse_loss(torch.sigmoid(self.offset(tokens))[has], targets["offset"][has])
        if self.word_embeds is not None and "word" in targets:
            want = self.word_embeds[targets["word"]]
            loss = loss + (1 - F.cosine_similarity(raw, want, dim=-1)).mean()
            acc["word"] = (F.normalize(raw, dim=-1) @ F.normalize(self.word_embeds, dim=-1).T).argmax(-1) \
                .eq(targets["word"]).float().mean().item()
        count = self.count(tokens.flatten(1))
        loss = loss + ce(count, targets["count"])
        acc["count"] = (count.argmax(-1) == targets["count"]).float().mean().item()
        return loss, acc
