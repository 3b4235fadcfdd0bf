"""omnimini's MMLU prompt and continuations are exactly what lm-evaluation-harness's `mmlu` task renders from the
same CSV row (its own task YAML, dataset swapped for the CSVs: omnimini/eval/lm_eval_mmlu.py)."""

import csv

import pytest

from omnimini.eval.tasks.base import TaskOptions
from omnimini.eval.tasks.mmlu import MMLU

# awkward rows on purpose: surrounding whitespace, numbers a CSV reader could turn into floats, "NaN"/"None",
# quotes, commas and a line break inside a field
ROWS = [["  What is 2 + 2?  ", "4", "1.50", "NaN", "None", "A"],
        ['Which "quoted, comma" option?', "a, b", "x\ny", " lead", "trail ", "D"],
        ["Plain question", "one", "two", "three", "four", "B"]]
DEV = [[f"Dev question {i}?", f"d{i}a", f"d{i}b", "0", "007", "ABCD"[i % 4]] for i in range(5)]
SUBJECTS = ["abstract_algebra", "high_school_us_history"]


def _data(tmp_path):
    for split, rows in (("test", ROWS), ("dev", DEV)):
        (tmp_path / "mmlu" / split).mkdir(parents=True)
        for s in SUBJECTS:
            with (tmp_path / "mmlu" / split / f"{s}_{split}.csv").open("w", newline="") as f:
                csv.writer(f).writerows(rows)
    return tmp_path


def test_omnimini_mmlu_prompt_is_lm_evals_template(tmp_path):
    items = MMLU().load(TaskOptions(data_dir=_data(tmp_path), shots=1))
    it = items[0]
    assert it.context == ("The following are multiple choice questions (with answers) about abstract algebra.\n\n"
                          "Dev question 0?\nA. d0a\nB. d0b\nC. 0\nD. 007\nAnswer: A\n\n"
                          "What is 2 + 2?\nA. 4\nB. 1.50\nC. NaN\nD. None\nAnswer:")
    assert it.continuations == [" A", " B", " C", " D"] and it.target == "A"


@pytest.mark.parametrize("shots", [0, 5])
def test_lm_eval_renders_the_same_requests(tmp_path, shots):
    pytest.importorskip("lm_eval", reason="lm-eval not installed (pip install lm-eval)")
    from omnimini.eval import lm_eval_mmlu as L

    data = _data(tmp_path / "data")
    names = L.write_task_configs(tmp_path / "cfg", data, SUBJECTS)
    tasks = L.load_tasks(tmp_path / "cfg", names, shots)
    items = MMLU().load(TaskOptions(data_dir=data, shots=shots))
    assert len(items) == len(ROWS) * len(SUBJECTS)
    for subject, name in zip(SUBJECTS, names, strict=True):
        theirs = L.rendered_requests(tasks[name])
        ours = [[(it.context, c) for c in it.continuations] for it in items if it.group == subject]
        assert theirs == ours
    # the gold answer lm-eval scores against is the CSV's letter
    doc = tasks[names[0]].test_docs()[1]
    assert tasks[names[0]].doc_to_target(doc) == "ABCD".index(ROWS[1][5])
