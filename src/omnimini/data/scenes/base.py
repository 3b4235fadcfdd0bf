"""Shared types of the scene task families: the Episode record, the TaskFamily protocol, errors."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Protocol

from PIL import Image


class SceneError(ValueError):
    """Bad input to a scene generator, simulator or scorer (unknown subset, action, seed...)."""


@dataclass
class Episode:
    """One task instance: an image, the prompt a chat model sees, and the reference answer."""

    family: str  # "qa" | "pointing" | "planning" | "navigation"
    seed: int
    subset: str  # qa: question type; planning: base/common_sense/...; others: "default"
    image: Image.Image
    prompt: str  # full user text, answer-format instructions included
    answer: str  # reference answer text (the SFT target)
    choices: list[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # JSON-able; everything the scorer needs

    def to_record(self) -> dict[str, Any]:
        """JSON-able summary (no image) for logs, previews and result files."""
        return {
            "family": self.family,
            "seed": self.seed,
            "subset": self.subset,
            "prompt": self.prompt,
            "answer": self.answer,
            "choices": self.choices,
            "meta": self.meta,
        }


class TaskFamily(Protocol):
    name: str
    subsets: list[str]

    def episode(self, seed: int, subset: str | None = None) -> Episode: ...

    def score(self, ep: Episode, response: str) -> dict[str, Any]: ...


def check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise SceneError(f"seed must be a non-negative int, got {seed!r}")
    return seed


def pick_subset(name: str, subsets: list[str], seed: int, subset: str | None) -> str:
    """The requested subset (validated), or one chosen deterministically from the seed."""
    if subset is None:
        return random.Random(f"{name}/subset/{seed}").choice(subsets)
    if subset not in subsets:
        raise SceneError(f"unknown {name} subset {subset!r}; expected one of {subsets}")
    return subset


def make_rng(name: str, seed: int, subset: str) -> random.Random:
    # A string seed is hashed with SHA-512 by `random`, so it is stable across processes and
    # Python runs (unlike hash()), and each family/subset gets an independent stream.
    return random.Random(f"{name}/{subset}/{check_seed(seed)}")
