"""Pick-and-place task planning in a small household grid world (EB-ALFRED / EB-Habitat style).

The home is a 3 x 2 grid of slots (two rooms split by a wall with a door); each used slot holds a
receptacle, some of which can be closed. A plan is a sequence of skills goto / pick / place /
open / close, run by `PlanSim`; the episode succeeds when every goal predicate holds after the
plan. `plan_reference` finds a shortest plan (see its docstring).
"""

from __future__ import annotations

import itertools
import json
import random
import re
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, ImageDraw

from .base import Episode, SceneError, make_rng, pick_subset
from .parsing import find_json_list
from .world import BACKGROUND, PALETTE, WALL_COLOUR, draw_shape, font

RECEPTACLES = {  # name -> can be closed
    "fridge": True, "cabinet": True, "drawer": True, "box": True,
    "table": False, "counter": False, "sink": False, "shelf": False, "basket": False,
}
OBJECTS = {  # type -> (drawn shape, indirect description for the common-sense subset)
    "apple": ("circle", "a piece of fruit"),
    "cup": ("square", "something to drink from"),
    "book": ("square", "something to read"),
    "key": ("circle", "something that unlocks a door"),
    "sponge": ("square", "something to scrub dishes with"),
    "pen": ("circle", "something to write with"),
    "towel": ("square", "something to dry your hands with"),
    "remote": ("square", "something to change the TV channel with"),
    "plate": ("circle", "something to serve food on"),
    "ball": ("circle", "a toy to throw"),
}
COLS, ROWS, MAX_PER_RECEPTACLE = 3, 2, 4  # objects are drawn 2 x 2 inside a receptacle
MAX_ACTIONS = 60
SKILLS = ("goto", "pick", "place", "open", "close")


@dataclass
class PlanWorld:
    receptacles: dict[str, dict[str, Any]]  # name -> {"slot": [col, row], "closable": bool, "open": bool}
    objects: dict[str, dict[str, Any]]  # name -> {"type", "colour", "at": receptacle}
    goals: list[list[str]] = field(default_factory=list)  # ["in", obj, rec] | ["closed", rec]

    def to_dict(self) -> dict[str, Any]:
        return {"receptacles": self.receptacles, "objects": self.objects, "goals": self.goals}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PlanWorld:
        return cls(json.loads(json.dumps(d["receptacles"])), json.loads(json.dumps(d["objects"])),
                   [list(g) for g in d["goals"]])


class InvalidAction(SceneError):
    """An action whose name, arguments or preconditions are wrong."""


@dataclass
class PlanSim:
    """Executes skills on a copy of a world, checking each precondition."""

    world: PlanWorld
    agent_at: str | None = None
    holding: str | None = None

    def __post_init__(self) -> None:
        self.world = PlanWorld.from_dict(self.world.to_dict())

    def _rec(self, name: str) -> dict[str, Any]:
        if name not in self.world.receptacles:
            raise InvalidAction(f"unknown receptacle {name!r}")
        return self.world.receptacles[name]

    def _obj(self, name: str) -> dict[str, Any]:
        if name not in self.world.objects:
            raise InvalidAction(f"unknown object {name!r}")
        return self.world.objects[name]

    def step(self, skill: str, args: list[str]) -> None:
        """Apply one action or raise InvalidAction saying which precondition failed."""
        if skill not in SKILLS:
            raise InvalidAction(f"unknown skill {skill!r}; expected one of {SKILLS}")
        want = {"goto": 1, "pick": 1, "place": 2, "open": 1, "close": 1}[skill]
        if skill == "place" and len(args) == 1 and self.holding and args[0] in self.world.receptacles:
            args = [self.holding, args[0]]  # place(R) with the held object implied
        if len(args) != want:
            raise InvalidAction(f"{skill} takes {want} argument(s), got {args}")
        getattr(self, f"_do_{skill}")(*args)

    def _do_goto(self, x: str) -> None:
        if x in self.world.objects:
            if self.holding == x:
                raise InvalidAction(f"goto({x}): the robot is holding {x}")
            x = self.world.objects[x]["at"]
        self._rec(x)
        self.agent_at = x

    def _do_pick(self, x: str) -> None:
        obj = self._obj(x)
        if self.holding is not None:
            raise InvalidAction(f"pick({x}): the hand already holds {self.holding}")
        if self.agent_at != obj["at"]:
            raise InvalidAction(f"pick({x}): the robot is not at {obj['at']}")
        if not self._rec(obj["at"])["open"]:
            raise InvalidAction(f"pick({x}): {obj['at']} is closed")
        obj["at"], self.holding = None, x

    def _do_place(self, x: str, r: str) -> None:
        rec = self._rec(r)
        if self.holding != x:
            raise InvalidAction(f"place({x}, {r}): the robot is not holding {x}")
        if self.agent_at != r:
            raise InvalidAction(f"place({x}, {r}): the robot is not at {r}")
        if not rec["open"]:
            raise InvalidAction(f"place({x}, {r}): {r} is closed")
        self.world.objects[x]["at"], self.holding = r, None

    def _do_open(self, r: str) -> None:
        self._toggle(r, True)

    def _do_close(self, r: str) -> None:
        self._toggle(r, False)

    def _toggle(self, r: str, to_open: bool) -> None:
        rec, verb = self._rec(r), "open" if to_open else "close"
        if not rec["closable"]:
            raise InvalidAction(f"{verb}({r}): {r} cannot be opened or closed")
        if self.agent_at != r:
            raise InvalidAction(f"{verb}({r}): the robot is not at {r}")
        if rec["open"] == to_open:
            raise InvalidAction(f"{verb}({r}): {r} is already {'open' if to_open else 'closed'}")
        rec["open"] = to_open

    def goal_holds(self, goal: list[str]) -> bool:
        if goal[0] == "in":
            return self.world.objects[goal[1]]["at"] == goal[2]
        if goal[0] == "closed":
            return not self.world.receptacles[goal[1]]["open"]
        raise SceneError(f"unknown goal predicate {goal!r}")

    def run(self, actions: list[tuple[str, list[str]]]) -> dict[str, Any]:
        """Execute a plan; the first invalid action ends it. Returns success, progress and the error."""
        error, done = None, 0
        if len(actions) > MAX_ACTIONS:
            error, actions = f"plan longer than {MAX_ACTIONS} actions", actions[:MAX_ACTIONS]
        for skill, args in actions:
            try:
                self.step(skill, args)
            except InvalidAction as e:
                error = str(e)
                break
            done += 1
        met = sum(self.goal_holds(g) for g in self.world.goals)
        n = len(self.world.goals)
        return {"success": met == n and bool(actions), "progress": met / n if n else 0.0,
                "executed": done, "error": error}


# ---------------------------------------------------------------- plan parsing

_VERBS = {"goto": "goto", "go_to": "goto", "go": "goto", "navigate": "goto", "walk": "goto", "pick": "pick",
          "pickup": "pick", "pick_up": "pick", "grab": "pick", "place": "place", "put": "place",
          "open": "open", "close": "close"}


def _clean_arg(a: str) -> str:
    return re.sub(r"\s+", "_", a.strip().strip("'\"`").strip().lower())


def parse_plan(text: str) -> list[tuple[str, list[str]]]:
    """Actions from a response: 'skill(a, b)' per line (numbering/bullets allowed), 'skill a b' lines,
    or a JSON list of such strings or of {"skill"/"action": ..., "args": [...]} objects."""
    items = find_json_list(text)
    if items and all(isinstance(i, str) for i in items):
        return parse_plan("\n".join(items))
    if items and all(isinstance(i, dict) for i in items):
        out = []
        for i in items:
            verb = _VERBS.get(str(i.get("skill", i.get("action", ""))).lower())
            args = i.get("args", i.get("arguments", []))
            if verb:
                out.append((verb, [_clean_arg(str(a)) for a in (args if isinstance(args, list) else [args])]))
        return out
    actions = []
    for line in text.splitlines():
        line = line.strip().strip("`*").lower()
        line = re.sub(r"^(\d+[\.\)]|[-*•])\s*", "", line)
        call = re.search(r"\b([a-z_]+)\s*\(([^)]*)\)", line)
        if call and call.group(1) in _VERBS:
            args = [_clean_arg(a) for a in call.group(2).split(",") if a.strip()]
            actions.append((_VERBS[call.group(1)], args))
            continue
        words = re.findall(r"[a-z0-9_]+", line)
        if words and words[0] in _VERBS and 2 <= len(words) <= 4:
            args = [w for w in words[1:] if w not in {"in", "into", "on", "onto", "to", "the"}]
            actions.append((_VERBS[words[0]], args))
    return actions


def format_plan(actions: list[tuple[str, list[str]]]) -> str:
    return "\n".join(f"{s}({', '.join(a)})" for s, a in actions)


# ---------------------------------------------------------------- planner


def plan_reference(world: PlanWorld) -> list[tuple[str, list[str]]]:
    """A shortest plan: the cheapest canonical plan over all orders of the "in" goals.

    Each misplaced object needs pick + place and the robot can carry one object, so a shortest plan
    moves objects one at a time; per object the canonical steps (goto source if elsewhere, open if
    closed, pick, goto target if elsewhere, open if closed, place) are minimal. A receptacle that
    must end closed is closed right after its last use, or visited at the end if never used.
    """
    moves = [g for g in world.goals if g[0] == "in"]
    closes = {g[1] for g in world.goals if g[0] == "closed"}
    best: list[tuple[str, list[str]]] | None = None
    for order in itertools.permutations(moves):
        plan = _canonical(world, list(order), closes)
        if best is None or len(plan) < len(best):
            best = plan
    assert best is not None
    return best


def _canonical(world: PlanWorld, order: list[list[str]], closes: set[str]) -> list[tuple[str, list[str]]]:
    sim, plan = PlanSim(world), []

    def do(skill: str, *args: str) -> None:
        sim.step(skill, list(args))
        plan.append((skill, list(args)))

    def use(r: str) -> None:  # be at r with it open
        if sim.agent_at != r:
            do("goto", r)
        if not sim.world.receptacles[r]["open"]:
            do("open", r)

    def maybe_close(r: str, later: list[list[str]], start: dict[str, str]) -> None:
        still_needed = any(r in (start[g[1]], g[2]) for g in later)
        if r in closes and not still_needed and sim.world.receptacles[r]["open"]:
            do("close", r)

    start = {g[1]: world.objects[g[1]]["at"] for g in order}
    for i, (_, obj, dst) in enumerate(order):
        later = order[i + 1:]
        src = sim.world.objects[obj]["at"]
        use(src)
        do("pick", obj)
        maybe_close(src, later, start)
        use(dst)
        do("place", obj, dst)
        maybe_close(dst, later, start)
    for r in sorted(closes):
        if sim.world.receptacles[r]["open"]:
            if sim.agent_at != r:
                do("goto", r)
            do("close", r)
    return plan


# ---------------------------------------------------------------- world generation and rendering


def _generate_world(rng: random.Random, n_objects: tuple[int, int], dup_type: bool) -> PlanWorld:
    slots = rng.sample([[c, r] for r in range(ROWS) for c in range(COLS)], rng.randint(5, 6))
    names = rng.sample(list(RECEPTACLES), len(slots))
    if not any(RECEPTACLES[n] for n in names):
        names[0] = "fridge" if "fridge" not in names else "drawer"
    recs = {n: {"slot": s, "closable": RECEPTACLES[n], "open": not RECEPTACLES[n] or rng.random() < 0.4}
            for n, s in zip(names, slots, strict=True)}
    n = rng.randint(*n_objects)
    types = rng.sample(list(OBJECTS), n)
    if dup_type:  # visual/spatial subsets need two objects of one type told apart by the image
        types[1] = types[0]
    objects: dict[str, dict[str, Any]] = {}
    colours = list(PALETTE)
    rng.shuffle(colours)
    for i, t in enumerate(types, start=1):
        free = [r for r in recs if sum(o["at"] == r for o in objects.values()) < MAX_PER_RECEPTACLE - 1]
        objects[f"{t}_{i}"] = {"type": t, "colour": colours[i % len(colours)], "at": rng.choice(free)}
    return PlanWorld(recs, objects)


def _cell(slot: list[int], w: int, h: int) -> tuple[float, float, float, float]:
    cw, ch = w / COLS, h / ROWS
    c, r = slot
    return (c * cw + w * 0.02, r * ch + h * 0.03, (c + 1) * cw - w * 0.02, (r + 1) * ch - h * 0.04)


def object_position(world: PlanWorld, name: str, w: int = 224, h: int = 224) -> tuple[float, float]:
    """Pixel centre where an object is drawn: a 2 x 2 layout inside its receptacle, below the label."""
    at = world.objects[name]["at"]
    here = [o for o in world.objects if world.objects[o]["at"] == at]
    k = here.index(name)
    x0, y0, x1, y1 = _cell(world.receptacles[at]["slot"], w, h)
    top = y0 + (y1 - y0) * 0.22
    return x0 + (x1 - x0) * (0.28 + 0.44 * (k % 2)), top + (y1 - top) * (0.27 + 0.46 * (k // 2))


def render_world(world: PlanWorld, size: int = 224) -> Image.Image:
    w = h = size
    img = Image.new("RGB", (w, h), BACKGROUND)
    draw = ImageDraw.Draw(img)
    t = max(3, size // 60)  # wall between the two rooms, with a door gap in the middle column
    draw.rectangle((0, h / 2 - t / 2, w / COLS, h / 2 + t / 2), fill=WALL_COLOUR)
    draw.rectangle((2 * w / COLS, h / 2 - t / 2, w, h / 2 + t / 2), fill=WALL_COLOUR)
    draw.rectangle((0, 0, w - 1, h - 1), outline=WALL_COLOUR, width=t)
    label_font, num_font = font(round(size * 0.055)), font(round(size * 0.065))
    for name, rec in world.receptacles.items():
        box = _cell(rec["slot"], w, h)
        fill = (236, 222, 196) if rec["open"] else (150, 130, 110)
        draw.rectangle(box, fill=fill, outline=(90, 70, 50), width=max(2, size // 112))
        draw.text(((box[0] + box[2]) / 2, box[1] + 3), name, fill=(15, 15, 15), font=label_font, anchor="mt")
        if not rec["open"]:
            mid = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2 + h * 0.03)
            draw.text(mid, "closed", fill=(235, 225, 210), font=label_font, anchor="mm")
    r = size * 0.065
    for name, obj in world.objects.items():
        if not world.receptacles[obj["at"]]["open"]:
            continue  # hidden inside a closed receptacle
        cx, cy = object_position(world, name, w, h)
        draw_shape(draw, OBJECTS[obj["type"]][0], PALETTE[obj["colour"]], cx, cy, r)
        draw.text((cx, cy), name.rsplit("_", 1)[1], fill=(255, 255, 255), font=num_font, anchor="mm",
                  stroke_width=2, stroke_fill=(0, 0, 0))
    return img


# ---------------------------------------------------------------- goals per subset


def _visible(world: PlanWorld, name: str) -> bool:
    return world.receptacles[world.objects[name]["at"]]["open"]


def _pick_goals(rng: random.Random, world: PlanWorld, objs: list[str], close_prob: float) -> list[list[str]]:
    goals = []
    for o in objs:
        dst = rng.choice([r for r in world.receptacles if r != world.objects[o]["at"]])
        goals.append(["in", o, dst])
    dsts = [g[2] for g in goals if world.receptacles[g[2]]["closable"]]
    if dsts and rng.random() < close_prob:
        goals.append(["closed", rng.choice(dsts)])
    return goals


def _prep(rec: str) -> str:
    return "on" if rec in ("table", "counter", "shelf") else "in"


def _goal_text(world: PlanWorld, goals: list[list[str]], names: dict[str, str]) -> str:
    parts = []
    for g in goals:
        if g[0] == "in":
            parts.append(f"put {names.get(g[1], g[1])} {_prep(g[2])} the {g[2]}")
    text = "; ".join(parts)
    closed = [g[1] for g in goals if g[0] == "closed"]
    if closed:
        verb = "is" if len(closed) == 1 else "are"
        text += f"; and make sure the {' and the '.join(closed)} {verb} closed at the end"
    return text[0].upper() + text[1:] + "."


def _design(rng: random.Random, subset: str) -> tuple[PlanWorld, str] | None:
    """A world with goals for the subset plus the task sentence, or None to try again."""
    dup = subset in ("visual", "spatial")
    world = _generate_world(rng, (6, 8) if subset == "long_horizon" else (4, 7), dup)
    objs = list(world.objects)
    names: dict[str, str] = {}
    if subset == "base":
        goals = _pick_goals(rng, world, [rng.choice(objs)], 0.2)
    elif subset == "complex":
        goals = _pick_goals(rng, world, rng.sample(objs, rng.randint(2, 3)), 0.6)
    elif subset == "long_horizon":
        goals = _pick_goals(rng, world, rng.sample(objs, rng.randint(4, 5)), 0.7)
    elif subset == "common_sense":
        target = rng.choice(objs)
        goals = _pick_goals(rng, world, [target], 0.2)
        names[target] = OBJECTS[world.objects[target]["type"]][1]
    else:  # visual / spatial: two objects of one type; the image tells which is meant
        a, b = objs[0], objs[1]
        if not (_visible(world, a) and _visible(world, b)):
            return None
        t = world.objects[a]["type"]
        target = rng.choice([a, b])
        other = b if target == a else a
        if subset == "visual":
            names[target] = f"the {world.objects[target]['colour']} {t}"
        else:
            pa, pb = object_position(world, target), object_position(world, other)
            dx, dy = pa[0] - pb[0], pa[1] - pb[1]
            if max(abs(dx), abs(dy)) < 40:
                return None
            where = (("left" if dx < 0 else "right") if abs(dx) >= abs(dy) else ("top" if dy < 0 else "bottom"))
            names[target] = f"the {t} nearer the {where} of the image"
        goals = _pick_goals(rng, world, [target], 0.2)
    world.goals = goals
    return world, _goal_text(world, goals, names)


def _listing(world: PlanWorld) -> str:
    recs = ", ".join(n + ("" if r["open"] else " (closed)") if r["closable"] else n
                     for n, r in world.receptacles.items())
    objs = ", ".join(f"{n} ({_prep(o['at'])} {o['at']})" for n, o in world.objects.items())
    return f"Receptacles: {recs}.\nObjects: {objs}."


PROMPT_HEAD = (
    "You control a household robot with one hand. The image is a top-down map of the home: each "
    "rectangle is a receptacle with its name; objects are coloured shapes marked with their number "
    "(cup_3 is drawn with the number 3). Closed receptacles are shaded and hide their contents."
)
SKILL_TEXT = (
    "Skills:\n"
    "- goto(X): walk to receptacle X, or to the receptacle where object X is\n"
    "- pick(X): pick up object X (hand empty; you are at its receptacle and it is open)\n"
    "- place(X, R): put the held object X in/on receptacle R (you are at R and it is open)\n"
    "- open(R), close(R): open or close receptacle R (you are at R)\n"
    "An invalid action ends the plan."
)


class PlanningFamily:
    name = "planning"
    subsets = ["base", "common_sense", "complex", "visual", "spatial", "long_horizon"]

    def __init__(self, image_size: int = 224):
        self.image_size = image_size

    def episode(self, seed: int, subset: str | None = None) -> Episode:
        subset = pick_subset(self.name, self.subsets, seed, subset)
        rng = make_rng(self.name, seed, subset)
        for _ in range(100):
            got = _design(rng, subset)
            if got is not None:
                break
        else:  # pragma: no cover
            raise SceneError(f"no {subset} planning task found for seed {seed}")
        world, task = got
        plan = plan_reference(world)
        prompt = (f"{PROMPT_HEAD}\n\n{_listing(world)}\n\n{SKILL_TEXT}\n\nTask: {task}\n\n"
                  "Write the complete plan, one action per line, using the exact names above, e.g.\n"
                  "goto(table)\npick(cup_3)\n...\nWrite only the actions.")
        meta = {"world": world.to_dict(), "goals": world.goals, "task": task, "optimal_length": len(plan)}
        return Episode(self.name, seed, subset, render_world(world, self.image_size), prompt,
                       format_plan(plan), None, meta)

    def score(self, ep: Episode, response: str) -> dict[str, Any]:
        actions = parse_plan(response)
        res = PlanSim(PlanWorld.from_dict(ep.meta["world"])).run(actions)
        return {"score": float(res["success"]), "parsed": format_plan(actions), "n_actions": len(actions),
                **res}
