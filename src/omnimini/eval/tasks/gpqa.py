"""GPQA main / diamond from the authors' CSV, options shuffled with a fixed seed per question.

The authors ask that questions never be published: nothing here prints, logs or stores question
or option text. Errors name the file and line only; results keep ids, letters and correctness;
the cache keeps only the extracted letter (``private = True``).
"""

from __future__ import annotations

import csv
import hashlib
import random
import sys
from pathlib import Path

from omnimini.eval.errors import EvalDataError
from omnimini.eval.tasks.base import EvalItem, Task, TaskOptions, limit_per_group, require_data_dir

ANSWER_COLUMNS = ("Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3")
REQUIRED = ("Question", *ANSWER_COLUMNS)
# simple-evals' template, the one behind GPT-4o mini's published 40.2
CHAT_TEMPLATE = (
    "Answer the following multiple choice question. The last line of your response should be of the "
    "following format: 'Answer: $LETTER' (without quotes) where LETTER is one of ABCD. Think step by "
    "step before answering.\n\n{question}\n\nA) {A}\nB) {B}\nC) {C}\nD) {D}"
)


def shuffle_seed(record_id: str, seed: int) -> int:
    return int.from_bytes(hashlib.sha256(f"gpqa:{seed}:{record_id}".encode()).digest()[:8], "big")


def shuffled_options(row: dict, record_id: str, seed: int) -> tuple[list[str], str]:
    options = [row[c].strip() for c in ANSWER_COLUMNS]
    order = list(range(4))
    random.Random(shuffle_seed(record_id, seed)).shuffle(order)
    return [options[i] for i in order], "ABCD"[order.index(0)]


def read_gpqa_csv(path: Path) -> list[tuple[int, dict]]:
    if not path.exists():
        raise EvalDataError(f"GPQA file not found: expected {path} (the authors' CSV)")
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # explanations can be long
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in REQUIRED if c not in (reader.fieldnames or [])]
        if missing:
            raise EvalDataError(f"{path}:1: missing column(s) {', '.join(missing)}")
        rows = []
        start = reader.line_num + 1
        for row in reader:
            empty = [c for c in REQUIRED if not (row.get(c) or "").strip()]
            if empty:  # name the columns, never their content
                raise EvalDataError(f"{path}:{start}: empty column(s) {', '.join(empty)}")
            rows.append((start, row))
            start = reader.line_num + 1  # a record may span several lines
    return rows


class GPQA(Task):
    private = True
    default_max_tokens = 2048

    def __init__(self, subset: str):
        self.subset = subset
        self.name = f"gpqa_{subset}"

    def load(self, opts: TaskOptions) -> list[EvalItem]:
        rel = f"gpqa/gpqa_{self.subset}.csv"
        root = require_data_dir(opts, f"GPQA {self.subset}", rel)
        items = []
        for index, (lineno, row) in enumerate(read_gpqa_csv(root / rel)):
            record_id = (row.get("Record ID") or "").strip() or f"row{lineno}"
            items.append(self.make_item(index, record_id, row, opts.seed))
        return limit_per_group(items, opts.limit)

    def make_item(self, index: int, record_id: str, row: dict, seed: int) -> EvalItem:
        options, answer = shuffled_options(row, record_id, seed)
        question = row["Question"].strip()
        chat = CHAT_TEMPLATE.format(question=question, **dict(zip("ABCD", options, strict=True)))
        context = ("What is the correct answer to this question:" + question + "\nChoices:\n"
                   + "\n".join(f"({L}) {o}" for L, o in zip("ABCD", options, strict=True)) + "\nAnswer:")
        return EvalItem(
            id=record_id,
            group="all",
            messages=[{"role": "user", "content": chat}],
            target=answer,
            choices=options,
            context=context,
            continuations=[f" ({L})" for L in "ABCD"],
            meta={"domain": (row.get("High-level domain") or "").strip(), "index": index},
        )
