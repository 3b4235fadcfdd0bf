"""Pointing: "where can X be placed <relation> Y?" answered with (x, y) points (Where2Place-style).

The free-space mask is analytic: a region that satisfies the relation (a band beside the
reference object, a corridor between two objects, or a container's interior) minus the
footprints of other objects, walls and containers. `meta` stores the region and obstacles as
plain numbers, so `in_mask(meta, x, y)` rebuilds the mask without the scene or the image.
"""

from __future__ import annotations

import json
import math
import random
import re
from typing import Any

from PIL import Image

from .base import Episode, SceneError, make_rng, pick_subset
from .world import Obj, Scene, generate_scene, render

RELATIONS = {
    "left": "directly to the left of",
    "right": "directly to the right of",
    "above": "directly above",
    "below": "directly below",
    "between": "between",
    "inside": "inside",
}
GRID = 64  # resolution used to measure mask area and choose the reference point
_NUM = r"(-?\d+(?:\.\d+)?|-?\.\d+)"


# ---------------------------------------------------------------- analytic mask


def in_region(region: dict[str, Any], x: float, y: float) -> bool:
    t = region["type"]
    if t == "rect":
        return region["x0"] <= x <= region["x1"] and region["y0"] <= y <= region["y1"]
    if t == "circle":
        return math.hypot(x - region["cx"], y - region["cy"]) <= region["r"]
    if t == "corridor":  # points near segment A-B whose projection falls in its middle part
        ax, ay, bx, by = region["ax"], region["ay"], region["bx"], region["by"]
        dx, dy = bx - ax, by - ay
        length2 = dx * dx + dy * dy
        s = ((x - ax) * dx + (y - ay) * dy) / length2
        dist = abs((x - ax) * dy - (y - ay) * dx) / math.sqrt(length2)
        return region["s0"] <= s <= region["s1"] and dist <= region["half_width"]
    raise SceneError(f"unknown pointing region type {t!r}")


def in_mask(meta: dict[str, Any], x: float, y: float) -> bool:
    """Whether normalised point (x, y) is free space satisfying the episode's relation."""
    m = meta["margin"]
    if not (m <= x <= 1 - m and m <= y <= 1 - m) or not in_region(meta["region"], x, y):
        return False
    if any(math.hypot(x - ox, y - oy) < r for ox, oy, r in meta["obstacles"]):
        return False
    return not any(x0 <= x <= x1 and y0 <= y <= y1 for x0, y0, x1, y1 in meta["blocked"])


def mask_points(meta: dict[str, Any], n: int = GRID) -> list[tuple[float, float]]:
    """Centres of the n x n grid cells that lie in the mask."""
    pts = [((i + 0.5) / n, (j + 0.5) / n) for j in range(n) for i in range(n)]
    return [p for p in pts if in_mask(meta, *p)]


def mask_image(meta: dict[str, Any], size: int = 224) -> Image.Image:
    """The mask as a black/white image (white = valid), for previews and debugging."""
    img = Image.new("L", (size, size), 0)
    px = img.load()
    for j in range(size):
        for i in range(size):
            if in_mask(meta, (i + 0.5) / size, (j + 0.5) / size):
                px[i, j] = 255
    return img


# ---------------------------------------------------------------- answer parsing


def _pairs_from_json(obj: Any) -> list[tuple[float, float]] | None:
    if isinstance(obj, dict):
        if "x" in obj and "y" in obj:
            return [(float(obj["x"]), float(obj["y"]))]
        for key in ("points", "point", "answer"):
            if key in obj:
                return _pairs_from_json(obj[key])
        return None
    if isinstance(obj, list):
        if len(obj) == 2 and all(isinstance(v, int | float) and not isinstance(v, bool) for v in obj):
            return [(float(obj[0]), float(obj[1]))]
        out: list[tuple[float, float]] = []
        for item in obj:
            got = _pairs_from_json(item)
            if got is None:
                return None
            out += got
        return out
    return None


def parse_points(text: str) -> list[tuple[float, float]]:
    """Every (x, y) pair in a response: JSON ([[x, y]], [{"x":..,"y":..}], {"points": ...}) or text."""
    for m in re.finditer(r"[\[{].*[\]}]", text, flags=re.S):
        try:
            got = _pairs_from_json(json.loads(m.group(0)))
        except (ValueError, TypeError):
            got = None
        if got:
            return got
    pairs = re.findall(rf"[\(\[]\s*{_NUM}\s*,\s*{_NUM}\s*[\)\]]", text)
    if not pairs:
        pairs = re.findall(rf"x\s*[=:]\s*{_NUM}\s*,?\s*y\s*[=:]\s*{_NUM}", text, flags=re.I)
    return [(float(a), float(b)) for a, b in pairs]


def to_normalised(points: list[tuple[float, float]], width: int, height: int) -> list[tuple[float, float]]:
    """Pixel coordinates (any value above 1) are divided by the image size; others are kept."""
    if any(v > 1.0 for p in points for v in p):
        return [(x / width, y / height) for x, y in points]
    return points


# ---------------------------------------------------------------- episodes


def _side_region(ref: Obj, rel: str) -> dict[str, Any]:
    band, reach, gap = ref.radius + 0.05, 0.3, ref.radius + 0.01
    if rel == "left":
        return {"type": "rect", "x0": ref.x - gap - reach, "x1": ref.x - gap, "y0": ref.y - band, "y1": ref.y + band}
    if rel == "right":
        return {"type": "rect", "x0": ref.x + gap, "x1": ref.x + gap + reach, "y0": ref.y - band, "y1": ref.y + band}
    if rel == "above":
        return {"type": "rect", "x0": ref.x - band, "x1": ref.x + band, "y0": ref.y - gap - reach, "y1": ref.y - gap}
    return {"type": "rect", "x0": ref.x - band, "x1": ref.x + band, "y0": ref.y + gap, "y1": ref.y + gap + reach}


def _task(rng: random.Random, scene: Scene, rel: str) -> tuple[str, dict[str, Any], Obj] | None:
    """(phrase, region, object to move) for a relation, or None when the scene cannot pose it."""
    visible = scene.visible_objects()
    if len(visible) < 2:
        return None
    mover = rng.choice(visible)
    others = [o for o in visible if o is not mover]
    if rel == "inside":
        opens = [r for r in scene.receptacles if r.is_open]
        if not opens:
            return None
        rc = rng.choice(opens)
        region = ({"type": "circle", "cx": rc.x, "cy": rc.y, "r": rc.w / 2 - 0.03} if rc.kind == "bowl" else
                  {"type": "rect", "x0": rc.x - rc.w / 2 + 0.03, "x1": rc.x + rc.w / 2 - 0.03,
                   "y0": rc.y - rc.h / 2 + 0.03, "y1": rc.y + rc.h / 2 - 0.03})
        return f"inside the {rc.name}", region, mover
    if rel == "between":
        pairs = [(a, b) for a in others for b in others if a.id < b.id and math.dist((a.x, a.y), (b.x, b.y)) > 0.3]
        if not pairs:
            return None
        a, b = rng.choice(pairs)
        region = {"type": "corridor", "ax": a.x, "ay": a.y, "bx": b.x, "by": b.y, "s0": 0.2, "s1": 0.8,
                  "half_width": 0.07}
        return f"between the {a.name()} and the {b.name()}", region, mover
    ref = rng.choice(others)
    return f"{RELATIONS[rel]} the {ref.name()}", _side_region(ref, rel), mover


def _reference_point(meta: dict[str, Any]) -> tuple[float, float] | None:
    """The mask point nearest the mask's centroid, rounded to 2 decimals and still inside the mask."""
    pts = mask_points(meta)
    if len(pts) < 20:  # too little free space to be a fair question
        return None
    cx, cy = sum(p[0] for p in pts) / len(pts), sum(p[1] for p in pts) / len(pts)
    for p in sorted(pts, key=lambda p: (p[0] - cx) ** 2 + (p[1] - cy) ** 2):
        q = (round(p[0], 2), round(p[1], 2))
        if in_mask(meta, *q):
            return q
    return None


class PointingFamily:
    name = "pointing"
    subsets = ["default"]

    def __init__(self, image_size: int = 224):
        self.image_size = image_size

    def episode(self, seed: int, subset: str | None = None) -> Episode:
        subset = pick_subset(self.name, self.subsets, seed, subset)
        rng = make_rng(self.name, seed, subset)
        for _ in range(100):
            scene = generate_scene(rng, n_objects=(3, 6), n_receptacles=(0, 2), inside_prob=0.2)
            rel = rng.choice(list(RELATIONS))
            task = _task(rng, scene, rel)
            if task is None:
                continue
            phrase, region, mover = task
            meta = self._meta(scene, region, mover, rel)
            point = _reference_point(meta)
            if point is not None:
                return self._make(seed, subset, scene, phrase, mover, meta, point)
        raise SceneError(f"no pointing task found for seed {seed}")  # pragma: no cover

    def _meta(self, scene: Scene, region: dict[str, Any], mover: Obj, rel: str) -> dict[str, Any]:
        # The moved object's centre must keep half its radius clear of other objects and walls.
        clear = mover.radius * 0.5
        obstacles = [[o.x, o.y, o.radius + clear] for o in scene.visible_objects() if o is not mover]
        blocked = [[w.x0 - clear, w.y0 - clear, w.x1 + clear, w.y1 + clear] for w in scene.walls]
        if rel != "inside":
            blocked += [list(r.bbox(clear)) for r in scene.receptacles]
        region = {k: round(v, 4) if isinstance(v, float) else v for k, v in region.items()}
        return {"relation": rel, "region": region, "obstacles": obstacles, "blocked": blocked,
                "margin": round(clear, 4), "image_size": [self.image_size, self.image_size],
                "scene": scene.to_dict(), "mover": mover.name()}

    def _make(self, seed: int, subset: str, scene: Scene, phrase: str, mover: Obj, meta: dict[str, Any],
              point: tuple[float, float]) -> Episode:
        s = self.image_size
        prompt = (
            f"The image ({s}x{s} pixels) is a top-down view of a table with coloured shapes"
            + (", containers" if scene.receptacles else "") + (" and dark grey walls" if scene.walls else "")
            + f".\n\nPoint to a free spot where the {mover.name()} can be placed {phrase}. The spot must be "
            "empty: not on another object, a wall or a container"
            + ("" if meta["relation"] != "inside" else " other than the one named")
            + ".\n\nAnswer with a list of points [(x, y), ...] in normalised image coordinates: x from 0 "
            "(left edge) to 1 (right edge), y from 0 (top edge) to 1 (bottom edge), e.g. [(0.25, 0.60)]. "
            "Every point you give is checked."
        )
        answer = f"[({point[0]:.2f}, {point[1]:.2f})]"
        return Episode(self.name, seed, subset, render(scene, s), prompt, answer, None, meta)

    def score(self, ep: Episode, response: str) -> dict[str, Any]:
        w, h = ep.meta["image_size"]
        pts = to_normalised(parse_points(response), w, h)
        hits = [in_mask(ep.meta, x, y) for x, y in pts]
        frac = sum(hits) / len(hits) if hits else 0.0
        return {"score": frac, "success": bool(hits) and all(hits), "parsed": pts, "n_points": len(pts)}
