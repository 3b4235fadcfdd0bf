"""Plain-background shapes: simple synthetic images that the table-top scene renderer does not draw.

One to four coloured shapes of varied size and position on a background of varied colour, with short questions
on colour, shape, count, presence and relative position. They teach (and test) seeing beyond one renderer: no
table, no receptacles, sizes on a continuum, backgrounds that change. Episodes follow the scene families'
protocol (`episode(seed)`, `score(ep, response)`), so training, `omnimini eval` and the probes share them.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageDraw

from .base import Episode, make_rng, pick_subset
from .parsing import parse_short
from .world import PALETTE, SHAPES, draw_shape

REGIONS = ["top left", "top", "top right", "left", "centre", "right", "bottom left", "bottom", "bottom right"]


@dataclass
class Shape:
    shape: str
    colour: str
    x: float  # centre, normalised (x right, y down)
    y: float
    r: float  # bounding radius, normalised

    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def size(self) -> str:
        return "small" if self.r < 0.14 else "large"


def region(x: float, y: float) -> str:
    row = 0 if y < 1 / 3 else (2 if y > 2 / 3 else 1)
    col = 0 if x < 1 / 3 else (2 if x > 2 / 3 else 1)
    return REGIONS[row * 3 + col]


def generate_shapes(rng: random.Random, n: tuple[int, int] = (1, 4)) -> tuple[tuple[int, int, int], list[Shape]]:
    """A background colour and non-overlapping shapes with unique colours (so "the red shape" is one shape)."""
    # light, low-saturation backgrounds: every palette colour stays clearly visible on them
    base = rng.randint(200, 250)
    bg = tuple(min(255, max(170, base + rng.randint(-25, 25))) for _ in range(3))
    colours = rng.sample(list(PALETTE), rng.randint(*n))
    shapes: list[Shape] = []
    for colour in colours:
        for _ in range(100):
            r = rng.uniform(0.08, 0.2)
            x, y = rng.uniform(r + 0.02, 0.98 - r), rng.uniform(r + 0.02, 0.98 - r)
            if all(math.hypot(s.x - x, s.y - y) > s.r + r + 0.03 for s in shapes):
                shapes.append(Shape(rng.choice(SHAPES), colour, round(x, 3), round(y, 3), round(r, 3)))
                break
    return bg, shapes


def render_shapes(bg: tuple[int, int, int], shapes: list[Shape], size: int = 224) -> Image.Image:
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    for s in shapes:
        draw_shape(draw, s.shape, PALETTE[s.colour], s.x * size, s.y * size, s.r * size)
    return img


def describe_shapes(shapes: list[Shape]) -> str:
    """A caption that only the image determines (shapes in reading order: top band first, then left to right)."""
    order = sorted(shapes, key=lambda s: (round(s.y * 3 - 0.5), s.x))
    n = len(shapes)
    parts = [f"a {s.size} {s.colour} {s.shape} at the {region(s.x, s.y)}" for s in order]
    return f"{n} shape{'s' if n != 1 else ''}: " + "; ".join(parts) + "."


# ---------------------------------------------------------------- questions: (text, answer, candidates)

def _q_colour(rng, shapes):
    if len(shapes) == 1:
        return "What colour is the shape?", shapes[0].colour, list(PALETTE)
    unique = [s for s in shapes if sum(t.shape == s.shape for t in shapes) == 1]
    if not unique:  # every shape kind appears twice: "the circle" would not name one shape
        return None, "", []
    s = rng.choice(unique)
    return f"What colour is the {s.shape}?", s.colour, list(PALETTE)


def _q_shape(rng, shapes):
    s = rng.choice(shapes)
    text = "What shape is in the image?" if len(shapes) == 1 else f"What shape is the {s.colour} object?"
    return text, s.shape, list(SHAPES)


def _q_count(rng, shapes):
    return "How many shapes are there?", str(len(shapes)), [str(i) for i in range(7)]


def _q_presence(rng, shapes):
    c = rng.choice(list(PALETTE))
    return f"Is there a {c} shape? Answer yes or no.", "yes" if any(s.colour == c for s in shapes) else "no", \
        ["yes", "no"]


def _q_horizontal(rng, shapes):
    pairs = [(a, b) for a in shapes for b in shapes if a is not b and abs(a.x - b.x) > 0.2]
    if not pairs:
        return None, "", []
    a, b = rng.choice(pairs)
    return f"Is the {a.name()} to the left or to the right of the {b.name()}?", \
        "left" if a.x < b.x else "right", ["left", "right"]


def _q_vertical(rng, shapes):
    pairs = [(a, b) for a in shapes for b in shapes if a is not b and abs(a.y - b.y) > 0.2]
    if not pairs:
        return None, "", []
    a, b = rng.choice(pairs)
    return f"Is the {a.name()} above or below the {b.name()}?", "above" if a.y < b.y else "below", \
        ["above", "below"]


def _q_where(rng, shapes):
    s = rng.choice(shapes)
    return f"Where is the {s.name()}? Answer with top, bottom, left, right or centre.", region(s.x, s.y), \
        list(REGIONS)


QUESTIONS = {"colour": _q_colour, "shape": _q_shape, "count": _q_count, "presence": _q_presence,
             "horizontal": _q_horizontal, "vertical": _q_vertical, "where": _q_where}


class ShapesFamily:
    """Short-answer questions about plain-background shapes (subset = question type)."""

    name = "shapes"
    subsets = list(QUESTIONS)

    def __init__(self, image_size: int = 224):
        self.image_size = image_size

    def episode(self, seed: int, subset: str | None = None) -> Episode:
        sub = pick_subset(self.name, self.subsets, seed, subset)
        rng = make_rng(self.name, seed, sub)
        for _ in range(50):  # some layouts cannot support a question type (e.g. no pair far apart): redraw
            bg, shapes = generate_shapes(rng)
            text, answer, candidates = QUESTIONS[sub](rng, shapes)
            if text:
                break
        else:  # pragma: no cover - 50 failed draws would be a generator bug
            raise RuntimeError(f"shapes: no {sub} question after 50 layouts (seed {seed})")
        return Episode(self.name, seed, sub, render_shapes(bg, shapes, self.image_size), text, answer,
                       meta={"candidates": candidates, "shapes": [vars(s) for s in shapes], "background": bg,
                             "caption": describe_shapes(shapes)})

    def score(self, ep: Episode, response: str) -> dict[str, Any]:
        got = parse_short(response, ep.meta["candidates"])  # normalise maps "Two." to "2"
        ok = got == ep.answer
        return {"success": ok, "score": float(ok), "parsed": got}
