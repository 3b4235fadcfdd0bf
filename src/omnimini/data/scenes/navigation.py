"""Instruction navigation in a walled grid world with a map view (EB-Navigation style).

The agent has a cell and a heading; actions are forward / turn_left / turn_right / stop. An
episode succeeds when the agent stops within `RADIUS` cells of the target within `MAX_STEPS`
actions. SPL = success * L* / max(L*, L) where L* is the BFS-shortest number of moves (forward
and turns) to a success cell and L the moves taken. Use one-shot (`NavigationFamily.score` on a
list of actions) or interactive (`NavEnv`).
"""

from __future__ import annotations

import math
import random
import re
from collections import deque
from typing import Any

from PIL import Image, ImageDraw

from .base import Episode, SceneError, check_seed, make_rng
from .parsing import find_json_list
from .world import BACKGROUND, PALETTE, SHAPES, WALL_COLOUR, draw_shape, shape_polygon

GRID = 9
MAX_STEPS = 20
RADIUS = 1.0  # success: Euclidean cell distance to the target <= 1 (the target's cell or a side neighbour)
HEADINGS = ["east", "south", "west", "north"]  # index + 1 is a right turn (y grows downwards)
STEP = [(1, 0), (0, 1), (-1, 0), (0, -1)]
ACTIONS = ("forward", "turn_left", "turn_right", "stop")

State = tuple[int, int, int]  # x, y, heading index


def _move(walls: set[tuple[int, int]], s: State, action: str) -> State:
    x, y, h = s
    if action == "turn_left":
        return x, y, (h + 3) % 4
    if action == "turn_right":
        return x, y, (h + 1) % 4
    nx, ny = x + STEP[h][0], y + STEP[h][1]
    if 0 <= nx < GRID and 0 <= ny < GRID and (nx, ny) not in walls:
        return nx, ny, h
    return s  # blocked: stays put


def _at_goal(s: State, target: tuple[int, int]) -> bool:
    return math.dist(s[:2], target) <= RADIUS


def shortest_moves(walls: set[tuple[int, int]], start: State, target: tuple[int, int]) -> list[str] | None:
    """BFS over (cell, heading): the fewest forward/turn moves that end within RADIUS of target."""
    prev: dict[State, tuple[State, str] | None] = {start: None}
    queue = deque([start])
    while queue:
        s = queue.popleft()
        if _at_goal(s, target):
            path = []
            while prev[s] is not None:
                s, a = prev[s]  # type: ignore[misc]
                path.append(a)
            return path[::-1]
        for a in ("forward", "turn_left", "turn_right"):
            n = _move(walls, s, a)
            if n not in prev:
                prev[n] = (s, a)
                queue.append(n)
    return None


def generate_layout(rng: random.Random) -> dict[str, Any]:
    """Walls, a target and distractor objects, and a start pose whose shortest path fits the budget."""
    for _ in range(200):
        walls: set[tuple[int, int]] = set()
        for _ in range(rng.randint(1, 3)):  # straight wall runs with a gap somewhere
            vertical, k = rng.random() < 0.5, rng.randint(1, GRID - 2)
            a, b = sorted(rng.sample(range(GRID), 2))
            cells = [(k, i) if vertical else (i, k) for i in range(a, b + 1)]
            gap = rng.randrange(len(cells))
            walls |= {c for j, c in enumerate(cells) if j != gap}
        free = [(x, y) for y in range(GRID) for x in range(GRID) if (x, y) not in walls]
        cells = rng.sample(free, 5)
        target, others, start = cells[0], cells[1:4], cells[4]
        pose = (*start, rng.randrange(4))
        path = shortest_moves(walls, pose, target)
        if path is None or not 3 <= len(path) <= MAX_STEPS - 6:
            continue
        kinds = rng.sample([(c, s) for c in PALETTE for s in SHAPES], 4)
        objects = [{"cell": list(c), "colour": k[0], "shape": k[1]} for c, k in zip([target, *others], kinds,
                                                                                    strict=True)]
        return {"walls": sorted([list(w) for w in walls]), "objects": objects, "start": list(pose),
                "shortest": len(path), "reference": path}
    raise SceneError("no navigation layout found")  # pragma: no cover


def render_map(layout: dict[str, Any], pose: State, size: int = 224) -> Image.Image:
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    c = size / GRID
    for i in range(1, GRID):
        draw.line((i * c, 0, i * c, size), fill=(215, 210, 198))
        draw.line((0, i * c, size, i * c), fill=(215, 210, 198))
    for x, y in layout["walls"]:
        draw.rectangle((x * c, y * c, (x + 1) * c, (y + 1) * c), fill=WALL_COLOUR)
    for o in layout["objects"]:
        x, y = o["cell"]
        draw_shape(draw, o["shape"], PALETTE[o["colour"]], (x + 0.5) * c, (y + 0.5) * c, c * 0.38)
    x, y, h = pose
    cx, cy = (x + 0.5) * c, (y + 0.5) * c
    draw.ellipse((cx - c * 0.45, cy - c * 0.45, cx + c * 0.45, cy + c * 0.45), fill=(255, 255, 255),
                 outline=(0, 0, 0), width=max(1, size // 150))
    draw.polygon(shape_polygon("arrow", cx, cy, c * 0.38, heading=h * math.pi / 2), fill=(0, 0, 0))
    return img


def _target_name(layout: dict[str, Any]) -> str:
    t = layout["objects"][0]
    return f"{t['colour']} {t['shape']}"


# ---------------------------------------------------------------- action parsing

_ALIASES = [(r"(?:move|go|step)?[ _-]?forwards?|ahead|fwd", "forward"),
            (r"(?:turn|rotate)[ _-]?left|left", "turn_left"),
            (r"(?:turn|rotate)[ _-]?right|right", "turn_right"),
            (r"stop|done|finish", "stop")]
_ACTION_RE = re.compile(r"\b(" + "|".join(f"(?:{p})" for p, _ in _ALIASES) + r")\b(?:\s*[x×*]\s*(\d+))?")
_FILLER = {"then", "and", "action", "actions", "finally", "times", "answer", "x"}


def _canonical(word: str) -> str:
    for pattern, name in _ALIASES:
        if re.fullmatch(pattern, word):
            return name
    raise SceneError(f"not an action: {word!r}")  # pragma: no cover - the regex only yields known words


def parse_actions(text: str) -> list[str]:
    """Actions from a JSON list or from lines that hold only actions ('forward', '2. turn left',
    'forward x3', 'forward, forward, stop'); commentary lines are ignored."""
    items = find_json_list(text)
    if items and all(isinstance(i, str) for i in items):
        return parse_actions("\n".join(items))
    out: list[str] = []
    for line in text.lower().splitlines():
        line = re.sub(r"^\s*(\d+[\.\):]|[-*•])\s*", "", line).strip().strip("`*")
        found = list(_ACTION_RE.finditer(line))
        rest = _ACTION_RE.sub(" ", line)
        if not found or any(w not in _FILLER for w in re.findall(r"[a-z]+", rest)):
            continue
        for f in found:
            out += [_canonical(f.group(1))] * min(int(f.group(2) or 1), MAX_STEPS)
    return out


# ---------------------------------------------------------------- environment


class NavEnv:
    """Interactive navigation episode: observe, step actions, read the result."""

    def __init__(self, seed: int, image_size: int = 224, layout: dict[str, Any] | None = None):
        self.seed, self.image_size = check_seed(seed), image_size
        self.layout = layout or generate_layout(make_rng("navigation", seed, "default"))
        self._walls = {tuple(w) for w in self.layout["walls"]}
        self._target = tuple(self.layout["objects"][0]["cell"])
        self.pose: State = tuple(self.layout["start"])  # type: ignore[assignment]
        self.moves, self.stopped, self.last = 0, False, "none yet"

    @property
    def done(self) -> bool:
        return self.stopped or self.moves >= MAX_STEPS

    def _text(self) -> str:
        x, y, h = self.pose
        return (f"You are at x={x}, y={y}, facing {HEADINGS[h]}. Last action: {self.last}. "
                f"Steps used: {self.moves} of {MAX_STEPS}.")

    def observe(self) -> tuple[Image.Image, str]:
        return render_map(self.layout, self.pose, self.image_size), self._text()

    def step(self, action: str) -> tuple[Image.Image, str, bool]:
        if self.done:
            raise SceneError("navigation episode is over; start a new NavEnv")
        if action not in ACTIONS:
            raise SceneError(f"unknown navigation action {action!r}; expected one of {ACTIONS}")
        if action == "stop":
            self.stopped, self.last = True, "stop"
        else:
            new = _move(self._walls, self.pose, action)
            blocked = action == "forward" and new == self.pose
            self.pose, self.moves = new, self.moves + 1
            self.last = f"{action} (blocked by a wall or the edge)" if blocked else action
        img, text = self.observe()
        return img, text, self.done

    def result(self) -> dict[str, Any]:
        """success needs an explicit or implicit stop (see `run`) within RADIUS of the target."""
        success = self.stopped and _at_goal(self.pose, self._target)
        best = self.layout["shortest"]
        spl = best / max(best, self.moves) if success else 0.0
        return {"success": success, "spl": spl, "steps": self.moves}

    def run(self, actions: list[str]) -> dict[str, Any]:
        """One-shot mode: execute actions in order; the end of the list counts as stop."""
        for a in actions:
            if self.done:
                break
            self.step(a)
        if not self.done:
            self.step("stop")
        return self.result()


class NavChatEnv:
    """Chat adapter over NavEnv for multi-turn evaluation: `step(reply_text)` runs every action parsed
    from a model reply (so a one-shot answer ending in stop finishes at once) and returns the next
    observation as {"image", "text"}; a reply with no action costs one step so the loop is bounded."""

    max_steps = MAX_STEPS + 1

    def __init__(self, env: NavEnv):
        self.env = env

    @property
    def done(self) -> bool:
        return self.env.done

    def step(self, reply: str) -> dict[str, Any]:
        actions = parse_actions(reply)
        if not actions:
            self.env.moves += 1
            self.env.last = "unreadable reply (no action found)"
        for a in actions:
            if self.env.done:
                break
            self.env.step(a)
        img, text = self.env.observe()
        return {"image": img, "text": text + " Reply with the next action(s), one per line; end with stop."}

    def result(self) -> dict[str, Any]:
        return self.env.result()


class NavigationFamily:
    name = "navigation"
    subsets = ["default"]

    def __init__(self, image_size: int = 224):
        self.image_size = image_size

    def episode(self, seed: int, subset: str | None = None) -> Episode:
        if subset not in (None, "default"):
            raise SceneError(f"unknown navigation subset {subset!r}; expected one of {self.subsets}")
        env = NavEnv(seed, self.image_size)
        img, text = env.observe()
        prompt = (
            f"The image is a top-down map of a {GRID}x{GRID} grid world. Dark grey cells are walls. You are "
            "the black arrow in the white circle; the arrow points the way you face. x counts columns from "
            "0 at the left, y counts rows from 0 at the top.\n\n"
            f"Task: go to the {_target_name(env.layout)} and stop within one cell of it (on its cell or a "
            "cell sharing a side with it).\n\n"
            "Actions: forward (move one cell the way you face; walls and the edge block you), turn_left and "
            "turn_right (turn 90 degrees in place), stop (end the episode). "
            f"At most {MAX_STEPS} actions.\n\n{text}\n\n"
            "Answer with the full list of actions, one per line, ending with stop. Write only the actions."
        )
        answer = "\n".join([*env.layout["reference"], "stop"])
        meta = {"layout": env.layout, "target": _target_name(env.layout), "shortest": env.layout["shortest"]}
        return Episode(self.name, seed, "default", img, prompt, answer, None, meta)

    def make_env(self, ep: Episode) -> NavChatEnv:
        """Interactive mode for chat models (used by the eval harness when present)."""
        return NavChatEnv(NavEnv(ep.seed, self.image_size, layout=ep.meta["layout"]))

    def score(self, ep: Episode, response: str) -> dict[str, Any]:
        actions = parse_actions(response)
        res = NavEnv(ep.seed, self.image_size, layout=ep.meta["layout"]).run(actions)
        return {"score": float(res["success"]), "parsed": actions, **res}
