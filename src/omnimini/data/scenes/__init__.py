"""Procedural 2D embodied scenes: QA, pointing, planning and navigation task families.

Every episode is a pure function of (family, seed, subset); see `tasks` for the registry and
the disjoint TRAIN_SEEDS / EVAL_SEEDS ranges.
"""

from .base import Episode, SceneError, TaskFamily
from .navigation import NavEnv
from .tasks import EVAL_SEEDS, FAMILIES, TRAIN_SEEDS, episodes, get_family

__all__ = ["EVAL_SEEDS", "FAMILIES", "TRAIN_SEEDS", "Episode", "NavEnv", "SceneError", "TaskFamily", "episodes",
           "get_family"]
