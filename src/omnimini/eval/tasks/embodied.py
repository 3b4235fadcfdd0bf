"""Embodied 2D tasks from `omnimini.data.scenes` on the fixed evaluation seeds.

Each episode already carries a prompt with explicit answer-format instructions and its own
scorer, so every chat model (ours or GPT-4o mini) is scored by the same rules. Navigation is
interactive when the scenes package provides an environment (``family.make_env(ep)``): the
model is asked for one action per turn and SPL comes from the environment.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from omnimini.eval.errors import EvalError
from omnimini.eval.stats import aggregate, summarize
from omnimini.eval.tasks.base import EvalItem, Task, TaskOptions

if TYPE_CHECKING:
    from omnimini.eval.runner import RunContext

DEFAULT_EPISODES = 200  # per family; --limit overrides
EXTRA_METRICS = ("spl", "success", "fraction_inside", "inside")


def _scenes():
    try:
        from omnimini.data.scenes import tasks as scene_tasks
    except ImportError as exc:  # the scenes package is developed alongside the harness
        raise EvalError(f"embodied tasks need omnimini.data.scenes, which failed to import: {exc}") from exc
    return scene_tasks


IMAGE_CONTROLS = ("blank", "mismatched")


def user_message(ep, image=None) -> list[dict]:
    image = ep.image if image is None else image
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": ep.prompt}]}]


def blank_like(image):
    """A featureless image of the same size, in the scenes' table colour (what an empty table looks like)."""
    from PIL import Image

    from omnimini.data.scenes.world import BACKGROUND

    return Image.new("RGB", image.size, BACKGROUND)


class SceneTask(Task):
    """One scene family, scored by the family's own scorer; sub-scores by subset."""

    default_max_tokens = 512
    primary_metric = "success"

    def __init__(self, name: str, family: str):
        self.name, self.family = name, family

    def load(self, opts: TaskOptions) -> list[EvalItem]:
        scene_tasks = _scenes()
        n = opts.limit if opts.limit is not None else DEFAULT_EPISODES
        seeds = list(scene_tasks.EVAL_SEEDS[:n])
        fam = scene_tasks.get_family(self.family)
        return [self.make_item(fam, ep) for ep in scene_tasks.episodes(self.family, seeds)]

    def make_item(self, fam, ep) -> EvalItem:
        meta = {"seed": ep.seed, "subset": ep.subset}
        for k in ("format", "qtype"):
            if k in ep.meta:
                meta[k] = ep.meta[k]
        return EvalItem(id=f"{self.family}/{ep.seed}", group=ep.subset, messages=user_message(ep),
                        target=ep.answer, choices=ep.choices, meta=meta, payload=(fam, ep))

    def with_image_control(self, items: list[EvalItem], control: str) -> list[EvalItem]:
        if control not in IMAGE_CONTROLS:
            raise EvalError(f"unknown image control {control!r}; expected one of {', '.join(IMAGE_CONTROLS)}")
        out = []
        for i, it in enumerate(items):
            fam, ep = it.payload
            # mismatched: the next item's image, so the answer priors (question text) are the same as the real
            # run's and only the image's content differs; a lone item has no other image and gets a blank one
            other = items[(i + 1) % len(items)].payload[1].image if len(items) > 1 else None
            image = blank_like(ep.image) if control == "blank" or other is None else other
            out.append(EvalItem(id=it.id, group=it.group, messages=user_message(ep, image), target=it.target,
                                choices=it.choices, meta={**it.meta, "image_control": control},
                                payload=(fam, ep)))
        return out

    def score_text(self, item: EvalItem, text: str) -> dict:
        fam, ep = item.payload
        s = dict(fam.score(ep, text))
        s["score"] = float(s.get("score", s.get("success", 0.0)))
        s.setdefault("correct", bool(s.get("success", s["score"] >= 1.0)))
        s.setdefault("pred", s.pop("parsed", None))
        return {k: v for k, v in s.items() if _jsonable(v)}

    async def run_item(self, item: EvalItem, ctx: RunContext) -> dict:
        fam, ep = item.payload
        if hasattr(fam, "make_env"):
            return await self.run_interactive(item, ctx, fam.make_env(ep))
        return await super().run_item(item, ctx)

    async def run_interactive(self, item: EvalItem, ctx: RunContext, env) -> dict:
        """Multi-turn loop: observation -> model reply -> env.step(reply), until done or step budget."""
        messages = list(item.messages)
        max_turns = int(getattr(env, "max_steps", 30))
        for _ in range(max_turns):
            result = await ctx.chat(item, messages, max_tokens=ctx.max_tokens or self.default_max_tokens)
            if result.error:
                return {"score": 0.0, "correct": False, "pred": None, "error": result.error}
            messages.append({"role": "assistant", "content": result.text})
            obs = env.step(result.text)
            if getattr(env, "done", False):
                break
            messages.append(_observation_message(obs, item.meta.get("image_control"),
                                                 item.messages[0]["content"][0].get("image")))
        s = dict(env.result())
        s["score"] = float(s.get("score", s.get("success", 0.0)))
        s.setdefault("correct", bool(s.get("success", False)))
        s["turns"] = sum(1 for m in messages if m["role"] == "assistant")
        return {k: v for k, v in s.items() if _jsonable(v)}

    def aggregate(self, outcomes: list[dict]) -> dict:
        agg = aggregate(outcomes)
        for extra in EXTRA_METRICS:
            vals = [float(o[extra]) for o in outcomes if isinstance(o.get(extra), int | float | bool)]
            if vals and extra != "success":
                agg[extra] = summarize(vals)
        for key in ("format", "qtype"):  # scene QA: multiple choice vs short answer, finer question types
            if any(key in o for o in outcomes):
                agg[f"by_{key}"] = aggregate(outcomes, group_key=key)["groups"]
        return agg


def _observation_message(obs, control: str | None = None, control_image=None) -> dict:
    if isinstance(obs, str):
        return {"role": "user", "content": obs}
    text, image = (obs.get("text", ""), obs.get("image")) if isinstance(obs, dict) else (str(obs), None)
    content: list[dict] = [{"type": "text", "text": text}]
    if image is not None and control is not None:  # controls replace every observation, not just the first
        image = blank_like(image) if control == "blank" else control_image
    if image is not None:
        content.insert(0, {"type": "image", "image": image})
    return {"role": "user", "content": content}


def _jsonable(v) -> bool:
    return v is None or isinstance(v, str | int | float | bool | list | dict)


SCENE_TASKS = {"scene_qa": "qa", "pointing": "pointing", "planning": "planning", "navigation": "navigation",
               "shapes": "shapes"}
