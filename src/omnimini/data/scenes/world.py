"""Top-down 2D table-top scenes: coloured shapes, receptacles and walls, generated from an RNG.

Coordinates are normalised: x grows to the right and y grows downwards, both in [0, 1], so
scenes are resolution independent and `render` can draw them at any size.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field

from PIL import Image, ImageDraw, ImageFont

from .base import SceneError

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 38, 38),
    "green": (34, 160, 60),
    "blue": (37, 99, 235),
    "yellow": (245, 200, 20),
    "purple": (147, 51, 200),
    "orange": (245, 128, 20),
}
SHAPES = ["circle", "square", "triangle", "star"]
SIZES = {"small": 0.045, "large": 0.075}  # radius of the shape's bounding circle
RECEPTACLE_KINDS = ["box", "bowl", "drawer"]
CLOSABLE = {"box", "drawer"}
BACKGROUND = (242, 238, 228)
WALL_COLOUR = (70, 70, 76)


@dataclass
class Obj:
    id: int
    shape: str
    colour: str
    size: str
    x: float
    y: float
    inside: str | None = None  # receptacle name

    @property
    def radius(self) -> float:
        return SIZES[self.size]

    def name(self, with_size: bool = False) -> str:
        return f"{self.size} {self.colour} {self.shape}" if with_size else f"{self.colour} {self.shape}"


@dataclass
class Receptacle:
    name: str  # unique in a scene; equal to the kind ("box", "bowl", "drawer")
    kind: str
    x: float  # centre
    y: float
    w: float
    h: float
    is_open: bool = True

    def contains(self, x: float, y: float, inset: float = 0.0) -> bool:
        if self.kind == "bowl":
            r = self.w / 2 - inset
            return (x - self.x) ** 2 + (y - self.y) ** 2 <= r * r
        return abs(x - self.x) <= self.w / 2 - inset and abs(y - self.y) <= self.h / 2 - inset

    def bbox(self, pad: float = 0.0) -> tuple[float, float, float, float]:
        return (self.x - self.w / 2 - pad, self.y - self.h / 2 - pad,
                self.x + self.w / 2 + pad, self.y + self.h / 2 + pad)


@dataclass
class Wall:
    x0: float
    y0: float
    x1: float
    y1: float

    def contains(self, x: float, y: float, pad: float = 0.0) -> bool:
        return self.x0 - pad <= x <= self.x1 + pad and self.y0 - pad <= y <= self.y1 + pad


@dataclass
class Scene:
    objects: list[Obj] = field(default_factory=list)
    receptacles: list[Receptacle] = field(default_factory=list)
    walls: list[Wall] = field(default_factory=list)

    def visible_objects(self) -> list[Obj]:
        """Objects a viewer can see: those not shut inside a closed receptacle."""
        closed = {r.name for r in self.receptacles if not r.is_open}
        return [o for o in self.objects if o.inside not in closed]

    def receptacle(self, name: str) -> Receptacle:
        for r in self.receptacles:
            if r.name == name:
                return r
        raise SceneError(f"scene has no receptacle {name!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Scene:
        return cls([Obj(**o) for o in d["objects"]], [Receptacle(**r) for r in d["receptacles"]],
                   [Wall(**w) for w in d["walls"]])


def _box_overlaps(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _free_for_object(scene: Scene, x: float, y: float, r: float, inside: Receptacle | None) -> bool:
    if not (r + 0.02 <= x <= 1 - r - 0.02 and r + 0.02 <= y <= 1 - r - 0.02):
        return False
    for o in scene.objects:
        if math.hypot(o.x - x, o.y - y) < o.radius + r + 0.025:
            return False
    if any(w.contains(x, y, pad=r + 0.015) for w in scene.walls):
        return False
    if inside is not None:
        return inside.contains(x, y, inset=r + 0.015)
    box = (x - r - 0.02, y - r - 0.02, x + r + 0.02, y + r + 0.02)
    return not any(_box_overlaps(box, _zone(rc)) for rc in scene.receptacles)


def _zone(rc: Receptacle, pad: float = 0.0) -> tuple[float, float, float, float]:
    """Receptacle footprint plus the strip above it where its label is drawn."""
    x0, y0, x1, y1 = rc.bbox(pad)
    return (x0, y0 - 0.05, x1, y1)


def _place_receptacles(rng: random.Random, scene: Scene, n: int, closed_prob: float) -> None:
    for kind in rng.sample(RECEPTACLE_KINDS, n):
        w, h = {"box": (0.3, 0.26), "bowl": (0.28, 0.28), "drawer": (0.34, 0.24)}[kind]
        for _ in range(200):
            x, y = rng.uniform(0.03 + w / 2, 0.97 - w / 2), rng.uniform(0.09 + h / 2, 0.97 - h / 2)
            cand = Receptacle(kind, kind, round(x, 3), round(y, 3), w, h)
            box = _zone(cand, pad=0.03)
            if not any(_box_overlaps(box, r.bbox(0.03)) for r in scene.receptacles) and not any(
                _box_overlaps(box, (wl.x0, wl.y0, wl.x1, wl.y1)) for wl in scene.walls
            ):
                cand.is_open = kind not in CLOSABLE or rng.random() >= closed_prob
                scene.receptacles.append(cand)
                break


def _place_wall(rng: random.Random, scene: Scene) -> None:
    t = 0.035
    if rng.random() < 0.5:  # vertical wall segment from the top or bottom edge
        x = rng.uniform(0.3, 0.7)
        length = rng.uniform(0.3, 0.5)
        y0 = 0.0 if rng.random() < 0.5 else 1.0 - length
        scene.walls.append(Wall(round(x, 3), round(y0, 3), round(x + t, 3), round(y0 + length, 3)))
    else:
        y = rng.uniform(0.3, 0.7)
        length = rng.uniform(0.3, 0.5)
        x0 = 0.0 if rng.random() < 0.5 else 1.0 - length
        scene.walls.append(Wall(round(x0, 3), round(y, 3), round(x0 + length, 3), round(y + t, 3)))


def generate_scene(
    rng: random.Random,
    n_objects: tuple[int, int] = (3, 6),
    n_receptacles: tuple[int, int] = (0, 2),
    n_walls: tuple[int, int] = (0, 1),
    inside_prob: float = 0.3,
    closed_prob: float = 0.3,
    colours: list[str] | None = None,
    shapes: list[str] | None = None,
) -> Scene:
    """A random scene; every object has a unique (colour, shape) pair so "the red circle" is unambiguous.

    Objects may sit inside receptacles (probability `inside_prob` each); box and drawer may be
    closed (`closed_prob`), hiding what is inside them.
    """
    colours = colours or list(PALETTE)
    shapes = shapes or SHAPES
    if n_objects[1] > len(colours) * len(shapes) or n_objects[0] > n_objects[1]:
        raise SceneError(f"cannot make {n_objects} objects with unique colour/shape pairs")
    for _ in range(20):  # a crowded layout can leave too little room: start over with fresh draws
        scene = _try_scene(rng, n_objects, n_receptacles, n_walls, inside_prob, closed_prob, colours, shapes)
        if len(scene.objects) >= n_objects[0]:
            return scene
    raise SceneError(f"could not place {n_objects[0]} objects; loosen the scene parameters")


def _try_scene(rng: random.Random, n_objects: tuple[int, int], n_receptacles: tuple[int, int],
               n_walls: tuple[int, int], inside_prob: float, closed_prob: float, colours: list[str],
               shapes: list[str]) -> Scene:
    scene = Scene()
    for _ in range(rng.randint(*n_walls)):
        _place_wall(rng, scene)
    _place_receptacles(rng, scene, min(rng.randint(*n_receptacles), len(RECEPTACLE_KINDS)), closed_prob)
    pairs = [(c, s) for c in colours for s in shapes]
    rng.shuffle(pairs)
    target = rng.randint(*n_objects)
    for colour, shape in pairs:
        if len(scene.objects) >= target:
            break
        size = rng.choice(list(SIZES))
        inside = rng.choice(scene.receptacles) if scene.receptacles and rng.random() < inside_prob else None
        for _ in range(100):
            if inside is not None:
                x, y = rng.uniform(*inside.bbox()[0::2]), rng.uniform(*inside.bbox()[1::2])
            else:
                x, y = rng.uniform(0, 1), rng.uniform(0, 1)
            if _free_for_object(scene, x, y, SIZES[size], inside):
                scene.objects.append(Obj(len(scene.objects), shape, colour, size, round(x, 3), round(y, 3),
                                         inside.name if inside else None))
                break
    return scene


# ---------------------------------------------------------------- rendering


def shape_polygon(shape: str, cx: float, cy: float, r: float, heading: float = 0.0) -> list[tuple[float, float]]:
    """Polygon vertices (pixel units) of a shape centred at (cx, cy) with bounding radius r."""
    if shape == "square":
        s = r * 0.82
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a) + r * 0.12)
                for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "star":
        pts = []
        for i in range(10):
            rr = r if i % 2 == 0 else r * 0.45
            a = -math.pi / 2 + i * math.pi / 5
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        return pts
    if shape == "arrow":  # agent marker, pointing along `heading` (radians, 0 = +x)
        pts = [(1.0, 0.0), (-0.7, 0.65), (-0.35, 0.0), (-0.7, -0.65)]
        c, s = math.cos(heading), math.sin(heading)
        return [(cx + r * (px * c - py * s), cy + r * (px * s + py * c)) for px, py in pts]
    raise SceneError(f"unknown shape {shape!r}")


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, colour: tuple[int, int, int], cx: float, cy: float,
               r: float) -> None:
    width = max(1, round(r / 8))
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour, outline=(20, 20, 20), width=width)
    else:
        draw.polygon(shape_polygon(shape, cx, cy, r), fill=colour, outline=(20, 20, 20), width=width)


def font(px: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=max(8, px))


def _draw_receptacle(draw: ImageDraw.ImageDraw, rc: Receptacle, w: int, h: int) -> None:
    x0, y0, x1, y1 = rc.bbox()
    box = (x0 * w, y0 * h, x1 * w, y1 * h)
    lw = max(2, w // 80)
    if rc.kind == "bowl":
        draw.ellipse(box, fill=(214, 226, 236), outline=(90, 110, 130), width=lw * 2)
    elif rc.kind == "box":
        if rc.is_open:
            draw.rectangle(box, fill=(236, 214, 176), outline=(130, 85, 40), width=lw * 2)
        else:  # closed lid: solid with a cross, contents hidden
            draw.rectangle(box, fill=(176, 122, 66), outline=(110, 70, 30), width=lw * 2)
            draw.line((box[0], box[1], box[2], box[3]), fill=(110, 70, 30), width=lw)
            draw.line((box[0], box[3], box[2], box[1]), fill=(110, 70, 30), width=lw)
    else:  # drawer: wooden frame with a handle on its lower edge
        fill = (225, 225, 215) if rc.is_open else (150, 150, 140)
        draw.rectangle(box, fill=fill, outline=(80, 80, 75), width=lw * 2)
        hx = (box[0] + box[2]) / 2
        draw.rectangle((hx - w * 0.05, box[3] - lw * 3, hx + w * 0.05, box[3] + lw), fill=(40, 40, 40))
        if not rc.is_open:
            for i in range(1, 4):
                yy = box[1] + (box[3] - box[1]) * i / 4
                draw.line((box[0] + lw * 2, yy, box[2] - lw * 2, yy), fill=(120, 120, 110), width=1)
    label = rc.name + ("" if rc.is_open else " (closed)")
    f = font(round(h * 0.05))
    draw.text(((box[0] + box[2]) / 2, box[1] - 2), label, fill=(20, 20, 20), font=f, anchor="md")


def render(scene: Scene, size: int | tuple[int, int] = 224) -> Image.Image:
    """Draw the scene top-down as an RGB image; objects in closed receptacles are not drawn."""
    w, h = (size, size) if isinstance(size, int) else size
    if w < 32 or h < 32:
        raise SceneError(f"image size must be at least 32x32, got {w}x{h}")
    img = Image.new("RGB", (w, h), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for wl in scene.walls:
        draw.rectangle((wl.x0 * w, wl.y0 * h, wl.x1 * w, wl.y1 * h), fill=WALL_COLOUR)
    for rc in scene.receptacles:
        _draw_receptacle(draw, rc, w, h)
    scale = min(w, h)
    for o in scene.visible_objects():
        draw_shape(draw, o.shape, PALETTE[o.colour], o.x * w, o.y * h, o.radius * scale)
    return img
