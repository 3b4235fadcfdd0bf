"""What every task is made of: items (prompt + target), a scorer and an aggregation."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omnimini.eval.errors import EvalDataError
from omnimini.eval.extract import LETTERS, extract_letter
from omnimini.eval.stats import aggregate

if TYPE_CHECKING:
    from omnimini.eval.runner import RunContext


@dataclass
class TaskOptions:
    data_dir: Path | None = None
    limit: int | None = None  # at most this many items per subject/category (lm-eval's --limit)
    shots: int = 0
    mode: str = "auto"  # auto | generate | loglik
    max_tokens: int | None = None  # None: the task's own default
    seed: int = 1234


@dataclass
class EvalItem:
    id: str
    group: str  # subject / category / question type, for sub-scores
    messages: list[dict]  # chat prompt (generation mode)
    target: Any  # correct letter or answer
    choices: list[str] | None = None  # option texts, for letter extraction by text
    context: str | None = None  # base-model prompt (log-likelihood mode)
    continuations: list[str] | None = None
    meta: dict = field(default_factory=dict)  # stored in results (never question text)
    payload: Any = None  # task-private object (an Episode); never stored


def resolve_data_dir(data_dir: str | Path | None) -> Path | None:
    value = data_dir or os.environ.get("OMNIMINI_DATA")
    return Path(value).expanduser() if value else None


def require_data_dir(opts: TaskOptions, task: str, expected: str) -> Path:
    root = resolve_data_dir(opts.data_dir)
    if root is None:
        raise EvalDataError(f"{task} needs a data directory: pass --data DIR or set OMNIMINI_DATA "
                            f"(expected DIR/{expected})")
    if not root.is_dir():
        raise EvalDataError(f"data directory {root} does not exist ({task} expects {root / expected})")
    return root


def limit_per_group(items: list[EvalItem], limit: int | None) -> list[EvalItem]:
    if limit is None:
        return items
    seen: dict[str, int] = {}
    kept = []
    for it in items:
        if seen.get(it.group, 0) < limit:
            seen[it.group] = seen.get(it.group, 0) + 1
            kept.append(it)
    return kept


class Task:
    """Base: a multiple-choice task scored by letter (generation) or by log-likelihood."""

    name = "task"
    private = False  # True: results/cache keep only ids, letters and correctness (GPQA)
    default_max_tokens = 256
    primary_metric = "accuracy"

    def load(self, opts: TaskOptions) -> list[EvalItem]:
        raise NotImplementedError

    def use_loglik(self, item: EvalItem, ctx: RunContext) -> bool:
        if item.continuations is None or ctx.mode == "generate":
            return False
        return ctx.mode == "loglik" or ctx.client_supports_loglik

    async def run_item(self, item: EvalItem, ctx: RunContext) -> dict:
        if self.use_loglik(item, ctx):
            lls = await ctx.loglikelihood(item.context, item.continuations)
            if lls is None:
                return {"score": 0.0, "correct": False, "pred": None, "error": "log-likelihood unsupported"}
            best = max(range(len(lls)), key=lls.__getitem__)
            pred = LETTERS[best]
            return {"score": float(pred == item.target), "correct": pred == item.target, "pred": pred,
                    "mode": "loglik"}
        result = await ctx.chat(item, item.messages, max_tokens=ctx.max_tokens or self.default_max_tokens)
        if result.error:
            return {"score": 0.0, "correct": False, "pred": None, "error": result.error}
        return {**self.score_text(item, result.text), "response": result.text, "mode": "generate"}

    def score_text(self, item: EvalItem, text: str) -> dict:
        pred = extract_letter(text, item.choices, n_options=len(item.choices or []) or None)
        ok = pred == item.target
        return {"score": float(ok), "correct": ok, "pred": pred}

    def redact(self, item: EvalItem, text: str) -> str:
        """What a private task lets the cache keep of a response: just the extracted letter."""
        return self.score_text(item, text).get("pred") or ""

    def aggregate(self, outcomes: list[dict]) -> dict:
        return aggregate(outcomes)

    def with_image_control(self, items: list[EvalItem], control: str) -> list[EvalItem] | None:
        """The same items with each image replaced (`blank`, or `mismatched`: another item's image), to tell a
        model that reads its images from one that scores by answer priors; None for tasks without images."""
        return None
