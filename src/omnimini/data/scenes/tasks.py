"""Registry of the scene task families and the fixed train/eval seed split.

Training draws seeds from TRAIN_SEEDS and evaluation from EVAL_SEEDS; the two ranges are
disjoint, so no evaluation scene (same seed -> same scene) is ever seen in training.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from .base import Episode, SceneError, TaskFamily
from .navigation import NavigationFamily
from .planning import PlanningFamily
from .pointing import PointingFamily
from .qa import QAFamily
from .shapes import ShapesFamily

TRAIN_SEEDS = range(0, 1_000_000)
EVAL_SEEDS = range(10_000_000, 10_010_000)

FAMILIES: dict[str, TaskFamily] = {
    "qa": QAFamily(),
    "pointing": PointingFamily(),
    "planning": PlanningFamily(),
    "navigation": NavigationFamily(),
    "shapes": ShapesFamily(),
}


def get_family(name: str) -> TaskFamily:
    try:
        return FAMILIES[name]
    except KeyError:
        raise SceneError(f"unknown scene task family {name!r}; expected one of {sorted(FAMILIES)}") from None


def episodes(family: str, seeds: Iterable[int], subset: str | None = None) -> Iterator[Episode]:
    """Episodes of one family for the given seeds (a subset of None mixes subsets by seed)."""
    fam = get_family(family)
    for seed in seeds:
        yield fam.episode(seed, subset)
