"""Evaluation harness: tasks (data + prompt + scorer), clients (in-process engine or any
OpenAI-compatible endpoint), an on-disk response cache, a runner, model card and leaderboard."""

from omnimini.eval.errors import EvalDataError, EvalError

__all__ = ["EvalDataError", "EvalError"]
