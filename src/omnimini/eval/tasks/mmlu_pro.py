"""MMLU-Pro: up to 10 options (A-J), scored per category; 0-shot (only the test split is on disk)."""

from __future__ import annotations

import json
from pathlib import Path

from omnimini.eval.errors import EvalDataError
from omnimini.eval.extract import LETTERS
from omnimini.eval.tasks.base import EvalItem, Task, TaskOptions, limit_per_group, require_data_dir

CHAT_SYSTEM = (
    "Answer the multiple choice question. You may think step by step, then finish with "
    '"The answer is (X)" where X is the letter of the correct option.'
)


def read_jsonl(path: Path, required: tuple[str, ...]) -> list[tuple[int, dict]]:
    if not path.exists():
        raise EvalDataError(f"file not found: expected {path}")
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise EvalDataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            missing = [k for k in required if not isinstance(row, dict) or k not in row]
            if missing:
                raise EvalDataError(f"{path}:{lineno}: missing field(s) {', '.join(missing)}")
            rows.append((lineno, row))
    return rows


def build_prompt(category: str, question: str, options: list[str]) -> str:
    head = f"The following are multiple choice questions (with answers) about {category}.\n\n"
    body = "\n".join([f"Question:\n{question.strip()}", "Options:"] +
                     [f"{LETTERS[i]}. {o}" for i, o in enumerate(options)])
    return head + body + "\nAnswer:"


class MMLUPro(Task):
    name = "mmlu_pro"
    default_max_tokens = 1024

    def load(self, opts: TaskOptions) -> list[EvalItem]:
        root = require_data_dir(opts, "MMLU-Pro", "mmlu_pro/test.jsonl")
        path = root / "mmlu_pro" / "test.jsonl"
        items = [self.make_item(path, lineno, row) for lineno, row in
                 read_jsonl(path, ("question_id", "question", "options", "answer", "category"))]
        return limit_per_group(items, opts.limit)

    def make_item(self, path: Path, lineno: int, row: dict) -> EvalItem:
        options = row["options"]
        if not isinstance(options, list) or not 1 <= len(options) <= 10:  # the real set has 1-option rows
            raise EvalDataError(f"{path}:{lineno}: options must be a list of 1-10 strings")
        answer = str(row["answer"]).strip().upper()
        if answer not in LETTERS[: len(options)]:
            raise EvalDataError(f"{path}:{lineno}: answer {row['answer']!r} is not one of the "
                                f"{len(options)} option letters")
        prompt = build_prompt(row["category"], row["question"], options)
        return EvalItem(
            id=str(row["question_id"]),
            group=str(row["category"]),
            messages=[{"role": "system", "content": CHAT_SYSTEM}, {"role": "user", "content": prompt}],
            target=answer,
            choices=[str(o) for o in options],
            context=prompt,
            continuations=[f" {LETTERS[i]}" for i in range(len(options))],
        )
