"""The shared MMLU CSVs as lm-evaluation-harness tasks, for checking omnimini's MMLU against the field's reference.

lm-eval cannot download `cais/mmlu` here, so each subject gets a task config (YAML, loaded through
``TaskManager(include_path=...)``) that *includes lm-eval's own* ``mmlu_<subject>.yaml`` — its prompt template,
description, choices, few-shot sampler and metric come from the installed lm-eval, not from a copy — and only
replaces the dataset: ``custom_dataset`` reads the test/dev CSVs into the columns `cais/mmlu` has (question,
subject, choices, answer as an index). Needs the optional `lm-eval` package (``pip install lm-eval``).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

TASK_PREFIX = "omnimini_csv_mmlu_"
TAG = "omnimini_csv_mmlu"


def _rows(path: Path, subject: str) -> list[dict]:
    # read on its own (not through omnimini's reader) so the comparison does not share the parsing code
    with path.open(newline="", encoding="utf-8") as f:
        return [{"question": r[0], "subject": subject, "choices": r[1:5], "answer": "ABCD".index(r[5].strip())}
                for r in csv.reader(f)]


def load_csv_split(data_dir: str, subject: str, **_ignored):
    """lm-eval's ``custom_dataset`` hook: {"test", "dev"} datasets of one subject, columns as in cais/mmlu."""
    import datasets

    root = Path(data_dir) / "mmlu"
    return datasets.DatasetDict({
        split: datasets.Dataset.from_list(_rows(root / split / f"{subject}_{split}.csv", subject))
        for split in ("test", "dev")})


def lm_eval_mmlu_dir() -> Path:
    import lm_eval

    d = Path(lm_eval.__file__).parent / "tasks" / "mmlu" / "default"
    if not (d / "_default_template_yaml").is_file():
        raise FileNotFoundError(f"lm-eval {lm_eval.__version__} has no mmlu/default task configs under {d}")
    return d


def write_task_configs(out_dir: Path, data_dir: Path, subjects: list[str]) -> list[str]:
    """One YAML per subject in out_dir; returns the task names (give out_dir to TaskManager's include_path)."""
    src = lm_eval_mmlu_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    names = []
    for s in subjects:
        base = src / f"mmlu_{s}.yaml"
        if not base.is_file():
            raise FileNotFoundError(f"lm-eval has no MMLU subject {s!r} ({base} missing)")
        name = TASK_PREFIX + s
        # JSON is valid YAML; the !function tag is the one non-JSON line
        body = {"include": str(base), "task": name, "tag": TAG,
                "dataset_path": "json", "dataset_name": None,  # unused: custom_dataset replaces the download
                "dataset_kwargs": {"data_dir": str(Path(data_dir).resolve()), "subject": s}}
        text = "\n".join(f"{k}: {json.dumps(v)}" for k, v in body.items())
        (out_dir / f"{name}.yaml").write_text(
            text + "\ncustom_dataset: !function omnimini.eval.lm_eval_mmlu.load_csv_split\n", encoding="utf-8")
        names.append(name)
    return names


def load_tasks(config_dir: Path, names: list[str], shots: int) -> dict:
    """{task name: lm-eval Task} with num_fewshot set, as simple_evaluate would set it."""
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(config_dir), include_defaults=False)
    tasks = tm.load(names)["tasks"]  # (get_task_dict is deprecated in lm-eval 0.4.13)
    for t in tasks.values():
        t.set_config(key="num_fewshot", value=shots)
    return tasks


def rendered_requests(task, limit: int | None = None) -> list[list[tuple[str, str]]]:
    """What lm-eval sends its model for each test doc: [(context, continuation)] per answer option."""
    task.build_all_requests(limit=limit, rank=0, world_size=1)
    by_doc: dict[int, list] = {}
    for inst in sorted(task.instances, key=lambda i: (i.doc_id, i.idx)):
        by_doc.setdefault(inst.doc_id, []).append(tuple(inst.arguments))
    return [by_doc[k] for k in sorted(by_doc)]
