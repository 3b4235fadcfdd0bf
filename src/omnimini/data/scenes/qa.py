"""Scene question answering: spatial relations, counting, attributes and containers (UniEQA/ERQA/VSI-style).

Each episode is either multiple choice (options A-D, the answer is a letter) or short answer
(a word, a number or "colour shape"); `meta["format"]` says which.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

from .base import Episode, SceneError, make_rng, pick_subset
from .parsing import LETTERS, normalise, parse_choice, parse_short
from .world import CLOSABLE, PALETTE, RECEPTACLE_KINDS, SHAPES, SIZES, Obj, Scene, generate_scene, render

DIRECTIONS = ["left", "right", "above", "below"]
BALANCED_MAX_COUNT = 6  # balanced counts: 0..6 (scenes hold few objects of one kind)
BALANCED_TRIES = 40  # scenes drawn per balanced episode before the last one of its template is kept
NUMBERS = [str(i) for i in range(13)]


@dataclass
class Question:
    text: str
    answer: str
    candidates: list[str]  # the answer vocabulary; options and short-answer parsing use it
    kind: str  # "object" | "word" | "number"
    qtype: str  # finer label, e.g. "nearest", "count_colour"


# ---------------------------------------------------------------- question generators
# Each takes (rng, scene) and returns a Question, or None when this scene cannot support it.


def _names(objs: list[Obj]) -> list[str]:
    return [o.name() for o in objs]


def q_relation(rng: random.Random, scene: Scene) -> Question | None:
    objs = scene.visible_objects()
    pairs = [(a, b) for a in objs for b in objs if a is not b]
    rng.shuffle(pairs)
    for a, b in pairs:
        dx, dy = a.x - b.x, a.y - b.y
        big, small = max(abs(dx), abs(dy)), min(abs(dx), abs(dy))
        if big > 0.15 and small < 0.5 * big:  # one axis clearly dominates: the answer is unambiguous
            ans = ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("below" if dy > 0 else "above")
            text = f"Where is the {a.name()} relative to the {b.name()}: left of, right of, above or below it?"
            return Question(text, ans, DIRECTIONS, "word", "relation")
    return None


def q_nearest(rng: random.Random, scene: Scene) -> Question | None:
    objs = scene.visible_objects()
    for ref in rng.sample(objs, len(objs)):
        others = sorted((o for o in objs if o is not ref), key=lambda o: math.dist((o.x, o.y), (ref.x, ref.y)))
        if len(others) >= 2:
            d0, d1 = (math.dist((o.x, o.y), (ref.x, ref.y)) for o in others[:2])
            if d1 > 1.35 * d0:
                text = f"Which object is closest to the {ref.name()}?"
                return Question(text, others[0].name(), _names(others), "object", "nearest")
    return None


def q_extreme(rng: random.Random, scene: Scene) -> Question | None:
    objs = scene.visible_objects()
    if len(objs) < 3:
        return None
    options = [("leftmost", lambda o: o.x), ("rightmost", lambda o: -o.x),
               ("topmost (closest to the top edge)", lambda o: o.y),
               ("bottommost (closest to the bottom edge)", lambda o: -o.y)]
    for word, key in rng.sample(options, len(options)):
        ranked = sorted(objs, key=key)
        if key(ranked[1]) - key(ranked[0]) > 0.08:
            return Question(f"Which object is the {word} in the image?", ranked[0].name(), _names(objs),
                            "object", "extreme")
    return None


def q_count(rng: random.Random, scene: Scene) -> Question | None:
    objs = scene.visible_objects()
    kind = rng.choice(["colour", "shape", "size", "total"])
    if kind == "colour":
        c = rng.choice(sorted({o.colour for o in objs}) + [rng.choice(list(PALETTE))])
        n, text = sum(o.colour == c for o in objs), f"How many {c} objects are there?"
    elif kind == "shape":
        s = rng.choice(SHAPES)
        n, text = sum(o.shape == s for o in objs), f"How many {s}s are there?"
    elif kind == "size":
        s = rng.choice(list(SIZES))
        n, text = sum(o.size == s for o in objs), f"How many {s} shapes are there?"
    else:
        n, text = len(objs), "How many coloured shapes are visible in total?"
    return Question(text + " Count only what is visible.", str(n), NUMBERS, "number", f"count_{kind}")


def q_attribute(rng: random.Random, scene: Scene) -> Question | None:
    objs = scene.visible_objects()
    for o in rng.sample(objs, len(objs)):
        kind = rng.choice(["colour", "shape", "size"])
        if kind == "colour":
            same = [p for p in objs if p.shape == o.shape]
            desc = o.shape if len(same) == 1 else f"{o.size} {o.shape}"
            if len(same) == 1 or sum(p.size == o.size for p in same) == 1:
                return Question(f"What colour is the {desc}?", o.colour, list(PALETTE), "word", "colour")
        elif kind == "shape":
            same = [p for p in objs if p.colour == o.colour]
            desc = f"{o.colour} object" if len(same) == 1 else f"{o.size} {o.colour} object"
            if len(same) == 1 or sum(p.size == o.size for p in same) == 1:
                return Question(f"What shape is the {desc}?", o.shape, SHAPES, "word", "shape")
        else:
            return Question(f"Is the {o.name()} small or large?", o.size, list(SIZES), "word", "size")
    return None


def q_receptacle(rng: random.Random, scene: Scene) -> Question | None:
    if not scene.receptacles:
        return None
    rc = rng.choice(scene.receptacles)
    visible = scene.visible_objects()
    roll = rng.random()
    if rc.kind in CLOSABLE and roll < 0.25:
        ans = "open" if rc.is_open else "closed"
        return Question(f"Is the {rc.name} open or closed?", ans, ["open", "closed"], "word", "open_closed")
    if rc.is_open and roll < 0.6:
        inside = [o for o in visible if o.inside == rc.name]
        if len(inside) == 1:
            return Question(f"Which object is inside the {rc.name}?", inside[0].name(), _names(visible),
                            "object", "contents")
        return Question(f"How many objects are inside the {rc.name}?", str(len(inside)), NUMBERS,
                        "number", "count_inside")
    if not visible:  # every object hidden in a closed container: nothing to ask about here
        return None
    o = rng.choice(visible)
    ans = o.inside or "none"
    text = f"Which container is the {o.name()} in? Say 'none' if it is not in any container."
    return Question(text, ans, RECEPTACLE_KINDS + ["none"], "word", "container")


GENERATORS = {
    "spatial": [q_relation, q_nearest, q_extreme],
    "counting": [q_count],
    "attribute": [q_attribute],
    "receptacle": [q_receptacle],
}


# ---------------------------------------------------------------- episodes and scoring


def _options(rng: random.Random, q: Question) -> list[str]:
    """Four options (fewer when the vocabulary is smaller) including the answer, shuffled."""
    if q.kind == "number":
        n = int(q.answer)
        pool = [str(k) for k in range(max(0, n - 3), n + 4) if k != n]
        others = rng.sample(pool, 3)
    else:
        pool = [c for c in q.candidates if c != q.answer]
        if q.kind == "object" and len(pool) < 3:  # pad with shapes that are not in the scene
            extra = [f"{c} {s}" for c in PALETTE for s in SHAPES if f"{c} {s}" not in q.candidates]
            pool += rng.sample(extra, 3 - len(pool))
        others = rng.sample(pool, min(3, len(pool)))
    opts = others + [q.answer]
    rng.shuffle(opts)
    return opts


def _intro(scene: Scene) -> str:
    parts = "coloured shapes (small or large circles, squares, triangles and stars)"
    if scene.receptacles:
        kinds = ", ".join(r.kind for r in scene.receptacles)
        parts += f", containers ({kinds}; a closed container hides what is inside)"
    if scene.walls:
        parts += " and dark grey walls"
    return f"The image is a top-down view of a table with {parts}."


def _ask(rng: random.Random, fmt: str, q: Question) -> tuple[str, str, list[str] | None]:
    """(question text with its options and instruction, reference answer, options or None) in format `fmt`."""
    if fmt == "mc":
        choices = _options(rng, q)
        letters = LETTERS[: len(choices)]
        lines = "\n".join(f"{letter}. {c}" for letter, c in zip(letters, choices, strict=True))
        instr = f"Answer with the letter of the correct option ({', '.join(letters)}) only."
        return f"{q.text}\n{lines}\n\n{instr}", letters[choices.index(q.answer)], choices
    instr = {"object": "Answer with the object's colour and shape only, e.g. 'red circle'.",
             "number": "Answer with a single number only.",
             "word": "Answer with a single word only."}[q.kind]
    return f"{q.text}\n\n{instr}", q.answer, None


class QAFamily:
    name = "qa"
    subsets = list(GENERATORS)

    def __init__(self, image_size: int = 224, fmt: str | None = None, balanced: bool = False):
        if fmt not in (None, "mc", "short"):
            raise SceneError(f"qa format must be 'mc', 'short' or None (mixed), got {fmt!r}")
        self.image_size, self.fmt = image_size, fmt
        # balanced (training data): each question template's answer drawn uniformly first, so a model that does
        # not look at the image scores chance on it (the plain generator's answers are skewed: "none", small
        # counts), and the only way down the loss is through the image
        self.balanced = balanced

    def episode(self, seed: int, subset: str | None = None) -> Episode:
        subset = pick_subset(self.name, self.subsets, seed, subset)
        rng = make_rng(self.name, seed, subset)
        fmt = self.fmt or rng.choice(["mc", "short"])
        scene, q = self._draw(rng, subset, seed)
        if self.balanced and q.kind != "object":
            vocab = q.candidates if q.kind == "word" else NUMBERS[: BALANCED_MAX_COUNT + 1]
            target = rng.choice(vocab)
            for _ in range(BALANCED_TRIES):
                if q.answer == target:
                    break
                s2, q2 = self._draw(rng, subset, seed)
                if q2.qtype == q.qtype:  # the same template, another scene
                    scene, q = s2, q2
        return self._make(seed, subset, fmt, rng, scene, q)

    def _draw(self, rng: random.Random, subset: str, seed: int) -> tuple[Scene, Question]:
        for _ in range(50):
            scene = generate_scene(rng, n_receptacles=(1, 2) if subset == "receptacle" else (0, 2),
                                   inside_prob=0.45 if subset == "receptacle" else 0.25)
            q = rng.choice(GENERATORS[subset])(rng, scene)
            if q is not None:
                return scene, q
        raise SceneError(f"no {subset} question found for seed {seed}")  # pragma: no cover

    def _make(self, seed: int, subset: str, fmt: str, rng: random.Random, scene: Scene, q: Question) -> Episode:
        meta: dict[str, Any] = {"format": fmt, "qtype": q.qtype, "answer_text": q.answer, "kind": q.kind,
                                "scene": scene.to_dict(), "image_size": self.image_size}
        text, answer, choices = _ask(rng, fmt, q)
        if choices is None:
            meta["candidates"] = q.candidates
        return Episode(self.name, seed, subset, render(scene, self.image_size), f"{_intro(scene)}\n\n{text}",
                       answer, choices, meta)

    def conversation(self, seed: int, turns: int = 8) -> tuple[Any, list[tuple[str, str]]]:
        """One scene, up to `turns` different questions about it (every subset in turn, formats mixed), as
        (image, [(user text, answer)]): the first turn carries the evaluator's intro. Training data: a read-out
        that must learn from tens of thousands of questions pays for the image and the intro once per scene
        instead of once per question."""
        rng = make_rng(self.name, seed, "conversation")
        scene = generate_scene(rng, n_receptacles=(0, 2), inside_prob=0.35)
        asked: set[str] = set()
        out: list[tuple[str, str]] = []
        for i in range(4 * turns):
            if len(out) == turns:
                break
            q = rng.choice(GENERATORS[self.subsets[i % len(self.subsets)]])(rng, scene)
            if q is None or q.text in asked:
                continue
            asked.add(q.text)
            text, answer, _ = _ask(rng, self.fmt or rng.choice(["mc", "short"]), q)
            out.append((f"{_intro(scene)}\n\n{text}" if not out else text, answer))
        return render(scene, self.image_size), out

    def score(self, ep: Episode, response: str) -> dict[str, Any]:
        if ep.choices is not None:
            parsed = parse_choice(response, ep.choices)
            ok = parsed == ep.answer
        else:
            parsed = parse_short(response, ep.meta["candidates"])
            ok = parsed is not None and normalise(parsed) == normalise(ep.answer)
        return {"score": float(ok), "success": ok, "parsed": parsed, "format": ep.meta["format"],
                "qtype": ep.meta["qtype"]}
