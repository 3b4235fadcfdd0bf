"""Humanity's Last Exam in its public format (id, question, answer, answer_type, optional image).

No copy of HLE is on these machines; the loader reads JSON (a list), JSON lines or parquet.
Exact-match answers are compared after normalisation (case, spaces, punctuation, LaTeX
wrappers, numbers); multiple-choice answers by letter. The official grader uses an LLM judge,
so our exact-match numbers are a strict lower bound.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from omnimini.eval.errors import EvalDataError
from omnimini.eval.extract import extract_letter
from omnimini.eval.tasks.base import EvalItem, Task, TaskOptions, limit_per_group, require_data_dir

CANDIDATES = ("hle/test.jsonl", "hle/test.json", "hle/hle.jsonl", "hle/hle.json", "hle/test.parquet")
REQUIRED = ("id", "question", "answer", "answer_type")
# the official HLE system prompts
SYSTEM_EXACT = (
    "Your response should be in the following format:\nExplanation: {your explanation for your final answer}"
    "\nExact Answer: {your succinct, final answer}\nConfidence: {your confidence score between 0% and 100% "
    "for your answer}"
)
SYSTEM_MC = (
    "Your response should be in the following format:\nExplanation: {your explanation for your answer choice}"
    "\nAnswer: {your chosen answer}\nConfidence: {your confidence score between 0% and 100% for your answer}"
)


def read_records(path: Path) -> list[tuple[int, dict]]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return list(enumerate(pq.read_table(path).to_pylist(), 2))
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise EvalDataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(data, list):
            raise EvalDataError(f"{path}: expected a JSON list of questions")
        return [(i + 1, r) for i, r in enumerate(data)]  # "line" = record number in a JSON list
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append((lineno, json.loads(line)))
            except ValueError as exc:
                raise EvalDataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
    return rows


def normalize_answer(text: str) -> str:
    text = text.strip()
    boxed = re.search(r"\\boxed\{(.*)\}", text)
    text = boxed.group(1) if boxed else text
    text = re.sub(r"\\(text|mathrm|textbf)\{([^}]*)\}", r"\2", text)
    text = text.replace("$", "").replace("\\", "").replace("*", "").lower().strip().rstrip(".")
    try:
        return repr(float(text.replace(",", "").replace(" ", "")))
    except ValueError:
        return re.sub(r"[\s\.,;:!\"'`]+", " ", text).strip()


def final_answer(text: str) -> str:
    """The model's stated answer: after 'Exact Answer:' / 'Answer:', else the last non-empty line."""
    found = re.findall(r"(?:exact answer|answer)\s*:\s*(.+)", text, flags=re.IGNORECASE)
    if found:
        return found[-1].strip()
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


class HLE(Task):
    name = "hle"
    default_max_tokens = 4096

    def find_file(self, opts: TaskOptions) -> Path:
        root = require_data_dir(opts, "HLE", CANDIDATES[0])
        for rel in CANDIDATES:
            if (root / rel).exists():
                return root / rel
        raise EvalDataError(f"HLE not found: expected one of {', '.join(str(root / c) for c in CANDIDATES)}")

    def load(self, opts: TaskOptions) -> list[EvalItem]:
        path = self.find_file(opts)
        items = [self.make_item(path, lineno, rec) for lineno, rec in read_records(path)]
        return limit_per_group(items, opts.limit)

    def make_item(self, path: Path, lineno: int, rec: dict) -> EvalItem:
        missing = [k for k in REQUIRED if not isinstance(rec, dict) or rec.get(k) in (None, "")]
        if missing:
            raise EvalDataError(f"{path}:{lineno}: missing field(s) {', '.join(missing)}")
        kind = rec["answer_type"]
        if kind not in ("exactMatch", "multipleChoice"):
            raise EvalDataError(f"{path}:{lineno}: answer_type must be exactMatch or multipleChoice, got {kind!r}")
        content: list[dict] | str = rec["question"]
        if rec.get("image"):
            content = [{"type": "text", "text": rec["question"]},
                       {"type": "image_url", "image_url": {"url": rec["image"]}}]
        system = SYSTEM_MC if kind == "multipleChoice" else SYSTEM_EXACT
        return EvalItem(
            id=str(rec["id"]),
            group=str(rec.get("category") or "all"),
            messages=[{"role": "system", "content": system}, {"role": "user", "content": content}],
            target=str(rec["answer"]).strip(),
            meta={"answer_type": kind, "has_image": bool(rec.get("image"))},
        )

    def score_text(self, item: EvalItem, text: str) -> dict:
        stated = final_answer(text)
        if item.meta["answer_type"] == "multipleChoice":
            pred = extract_letter(stated, n_options=26) or extract_letter(text, n_options=26)
            ok = pred is not None and pred == item.target.upper()
        else:
            pred = stated
            ok = normalize_answer(stated) == normalize_answer(item.target)
        return {"score": float(ok), "correct": ok, "pred": pred}
