"""MMLU (Hendrycks et al.) in lm-evaluation-harness's `mmlu` protocol.

Prompt: "The following are multiple choice questions (with answers) about {subject}.\\n\\n"
+ k dev examples (first k, "…\\nAnswer: X\\n\\n") + "{question}\\nA. …\\nD. …\\nAnswer:";
base models are scored by the log-likelihood of " A".." D", chat models by the letter they write.
"""

from __future__ import annotations

import csv
from pathlib import Path

from omnimini.eval.errors import EvalDataError
from omnimini.eval.tasks.base import EvalItem, Task, TaskOptions, require_data_dir

LETTERS4 = "ABCD"
CHAT_SYSTEM = (
    "Answer the multiple choice question with the letter of the correct option only "
    "(for example: Answer: B)."
)


def read_mmlu_csv(path: Path) -> list[dict]:
    """Rows of one subject file: no header; question, A, B, C, D, answer letter."""
    rows = []
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        for row in reader:
            if len(row) != 6:
                raise EvalDataError(f"{path}:{reader.line_num}: expected 6 columns "
                                    f"(question, A, B, C, D, answer), got {len(row)}")
            answer = row[5].strip().upper()
            if answer not in LETTERS4:
                raise EvalDataError(f"{path}:{reader.line_num}: answer must be one of A-D, got {row[5]!r}")
            rows.append({"question": row[0], "choices": row[1:5], "answer": answer, "line": reader.line_num})
    return rows


def format_question(row: dict) -> str:
    lines = [row["question"].strip()] + [f"{L}. {c}" for L, c in zip(LETTERS4, row["choices"], strict=True)]
    return "\n".join(lines) + "\nAnswer:"


def build_prompt(subject: str, row: dict, shots: list[dict]) -> str:
    head = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    examples = "".join(f"{format_question(s)} {s['answer']}\n\n" for s in shots)
    return head + examples + format_question(row)


class MMLU(Task):
    name = "mmlu"
    default_max_tokens = 32

    def subjects(self, root: Path) -> list[str]:
        test_dir = root / "mmlu" / "test"
        files = sorted(test_dir.glob("*_test.csv"))
        if not files:
            raise EvalDataError(f"MMLU test files not found: expected {test_dir}/<subject>_test.csv "
                                "(57 subjects, e.g. abstract_algebra_test.csv)")
        return [f.name[: -len("_test.csv")] for f in files]

    def dev_rows(self, root: Path, subject: str, shots: int) -> list[dict]:
        if shots <= 0:
            return []
        path = root / "mmlu" / "dev" / f"{subject}_dev.csv"
        if not path.exists():
            raise EvalDataError(f"{shots}-shot MMLU needs the dev examples: expected {path}")
        rows = read_mmlu_csv(path)
        if len(rows) < shots:
            raise EvalDataError(f"{path} has {len(rows)} examples, fewer than --shots {shots}")
        return rows[:shots]  # lm-eval's first_n sampler

    def load(self, opts: TaskOptions) -> list[EvalItem]:
        root = require_data_dir(opts, "MMLU", "mmlu/test/<subject>_test.csv")
        items = []
        for subject in self.subjects(root):
            shots = self.dev_rows(root, subject, opts.shots)
            rows = read_mmlu_csv(root / "mmlu" / "test" / f"{subject}_test.csv")
            rows = rows[: opts.limit] if opts.limit is not None else rows  # lm-eval's --limit: per subject
            items += [self.make_item(subject, i, row, shots) for i, row in enumerate(rows)]
        return items

    def make_item(self, subject: str, index: int, row: dict, shots: list[dict]) -> EvalItem:
        prompt = build_prompt(subject, row, shots)
        return EvalItem(
            id=f"{subject}/{index}",
            group=subject,
            messages=[{"role": "system", "content": CHAT_SYSTEM}, {"role": "user", "content": prompt}],
            target=row["answer"],
            choices=row["choices"],
            context=prompt,
            continuations=[f" {L}" for L in LETTERS4],
        )
