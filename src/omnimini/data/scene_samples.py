"""Procedural scenes as training samples: captions for pre-training, task episodes as (image, chat) for SFT.

Sample i of a stream is a pure function of (stream seed, i), so the data position is just a counter and a resumed
run sees exactly the samples an uninterrupted one would. Seeds come from TRAIN_SEEDS only; evaluation uses the
disjoint EVAL_SEEDS.
"""

from __future__ import annotations

import random

import torch

from omnimini.data.chat import encode_chat_sample
from omnimini.data.text import DataError
from omnimini.images import to_pixels


def _where(x: float, y: float) -> str:
    row = "top" if y < 1 / 3 else ("bottom" if y > 2 / 3 else "middle")
    col = "left" if x < 1 / 3 else ("right" if x > 2 / 3 else "centre")
    return "centre" if (row, col) == ("middle", "centre") else f"{row} {col}"


def _reading_order(o) -> tuple[int, float]:
    return (0 if o.y < 1 / 3 else (2 if o.y > 2 / 3 else 1), o.x)


def scene_caption(scene) -> str:
    """A plain-English description of what a viewer sees in the rendered scene. Objects are listed in reading
    order (top band first, left to right), so every word of the caption is a function of the image: a caption
    model that looks can drive its loss towards zero, which makes captions a strong grounding signal."""
    objs = sorted(scene.visible_objects(), key=_reading_order)
    parts = [f"a {o.size} {o.colour} {o.shape} at the {_where(o.x, o.y)}"
             + (f" inside the {o.inside}" if o.inside else "") for o in objs]
    text = f"A top-down view of a table with {len(objs)} shape{'s' if len(objs) != 1 else ''}: "
    text += "; ".join(parts) + "."
    for rc in scene.receptacles:
        state = "" if rc.kind == "bowl" else (" (open)" if rc.is_open else " (closed)")
        text += f" There is a {rc.kind}{state} at the {_where(rc.x, rc.y)}."
    if scene.walls:
        text += " A dark grey wall crosses the table."
    return text


def image_sample(tok, messages: list[dict], image, image_size: int, tokens_per_image: int, seq_len: int,
                 ) -> dict | None:
    """A chat sample whose first user turn carries one image (as placeholder tokens) plus its pixels."""
    s = encode_chat_sample(tok, messages, image_tokens=tokens_per_image, max_len=seq_len)
    if s is None:
        return None
    if s["input_ids"].count(tok.image_token_id) != tokens_per_image:
        return None  # truncation cut into the image placeholders
    s["pixels"] = to_pixels(image, image_size)[None]
    return s


def _user(image_first: bool, text: str) -> dict:
    return {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}


class SceneSource:
    """Resumable stream of scene samples.

    kind="caption": "Describe the image." -> caption (for pre-training with images);
    kind="task": episodes of the given families (e.g. qa) as chat samples with the reference answer.
    """

    def __init__(self, tok, model_cfg, seq_len: int, *, kind: str = "task", families=("qa",),
                 seed: int = 0, qa_format: str | None = None, balanced: bool = False):
        if model_cfg.vision is None or tok.image_token_id is None:
            raise DataError("scene samples need a model with a vision encoder and a tokenizer with <|image|>")
        if kind not in ("caption", "task"):
            raise DataError(f"scene sample kind must be caption|task, got {kind!r}")
        self.tok, self.seq_len, self.kind, self.seed = tok, seq_len, kind, seed
        self.families = list(families)
        self.qa_format = qa_format
        self.image_size = model_cfg.vision.image_size
        self.tokens_per_image = model_cfg.vision.tokens_per_image
        self.index = 0
        self._fams = ({f: make_family(f, self.image_size, qa_format, balanced) for f in self.families}
                      if kind == "task" else {})

    def __iter__(self):
        return self

    def _seed(self, i: int) -> int:
        from omnimini.data.scenes.tasks import TRAIN_SEEDS

        r = random.Random(f"scenes/{self.seed}/{i}").randrange(len(TRAIN_SEEDS))
        return TRAIN_SEEDS[r]

    def make(self, i: int) -> dict | None:
        seed = self._seed(i)
        if self.kind == "caption":
            from omnimini.data.scenes.world import generate_scene, render

            scene = generate_scene(random.Random(f"caption/{seed}"))
            msgs = [_user(True, "Describe the image."), {"role": "assistant", "content": scene_caption(scene)}]
            return image_sample(self.tok, msgs, render(scene, self.image_size), self.image_size,
                                self.tokens_per_image, self.seq_len)
        fam = self.families[i % len(self.families)]
        ep = self._fams[fam].episode(seed)
        msgs = [_user(True, ep.prompt), {"role": "assistant", "content": ep.answer}]
        return image_sample(self.tok, msgs, ep.image, self.image_size, self.tokens_per_image, self.seq_len)

    def __next__(self) -> dict:
        for _ in range(100):
            s = self.make(self.index)
            self.index += 1
            if s is not None:
                return s
        raise DataError(f"scene samples do not fit in seq_len={self.seq_len}; raise it")

    def state_dict(self) -> dict:
        return {"index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.index = state["index"]


def make_family(name: str, image_size: int, qa_format: str | None = None, balanced: bool = False):
    """A task family rendering at the model's image size (the registry's instances render at 224 px)."""
    from omnimini.data.scenes.tasks import get_family

    fam = get_family(name)
    if name == "qa":
        from omnimini.data.scenes.qa import QAFamily

        return QAFamily(image_size=image_size, fmt=qa_format, balanced=balanced)
    if hasattr(fam, "image_size"):
        try:
            return type(fam)(image_size=image_size)
        except TypeError:
            return fam
    return fam


def eval_pixels(ep, image_size: int) -> torch.Tensor:
    return to_pixels(ep.image, image_size)[None]
