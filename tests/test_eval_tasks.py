"""Eval harness: loaders and prompts on fixtures in the real layouts, letter extraction, scoring, CIs.

The fixture writers here are imported by the other test_eval_* files.
"""

import csv
import json
import math

import pytest

from omnimini.eval.errors import EvalDataError, EvalError
from omnimini.eval.extract import extract_letter
from omnimini.eval.stats import aggregate, normal_ci, summarize, wilson_ci
from omnimini.eval.tasks import get_tasks
from omnimini.eval.tasks.base import TaskOptions
from omnimini.eval.tasks.gpqa import GPQA
from omnimini.eval.tasks.hle import HLE, normalize_answer
from omnimini.eval.tasks.mmlu import MMLU
from omnimini.eval.tasks.mmlu_pro import MMLUPro

MMLU_ROWS = {
    "high_school_physics": [
        ["What is 2+2? [ok]", "3", "4", "5", "6", "B"],
        ["Pick C [ok]", "x", "y", "z", "w", "C"],
        ["Pick A [wrong]", "p", "q", "r", "s", "A"],
    ],
    "anatomy": [
        ["Bones in a hand? [ok]", "27", "12", "5", "100", "A"],
        ["Pick D [ok]", "a", "b", "c", "d", "D"],
    ],
}
MMLU_DEV = {
    "high_school_physics": [["Dev question one", "a", "b", "c", "d", "B"], ["Dev two", "e", "f", "g", "h", "D"]],
    "anatomy": [["Anatomy dev", "i", "j", "k", "l", "A"], ["Anatomy dev 2", "m", "n", "o", "p", "C"]],
}


def write_csv(path, rows, header=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        if header:
            w.writerow(header)
        w.writerows(rows)


def write_mmlu(root, rows=MMLU_ROWS, dev=MMLU_DEV):
    for subject, rs in rows.items():
        write_csv(root / "mmlu" / "test" / f"{subject}_test.csv", rs)
    for subject, rs in dev.items():
        write_csv(root / "mmlu" / "dev" / f"{subject}_dev.csv", rs)
    return root


def write_mmlu_pro(root):
    recs = [
        {"question_id": 1, "question": "Ten options, answer J", "options": [f"o{i}" for i in range(10)],
         "answer": "J", "answer_index": 9, "category": "math", "src": "x"},
        {"question_id": 2, "question": "Four options, answer B", "options": ["w", "x", "y", "z"],
         "answer": "B", "answer_index": 1, "category": "law", "src": "x"},
        {"question_id": 3, "question": "Another math", "options": ["1", "2", "3"],
         "answer": "C", "answer_index": 2, "category": "math", "src": "x"},
    ]
    path = root / "mmlu_pro" / "test.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return recs


GPQA_HEADER = ["Pre-Revision Question", "Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2",
               "Incorrect Answer 3", "Explanation", "Record ID", "High-level domain"]


def write_gpqa(root, subset="diamond", n=6):
    rows = [["old", f"Secret question {i}?", f"right{i}", f"wrong{i}a", f"wrong{i}b", f"wrong{i}c",
             "multi\nline explanation", f"rec{i:03d}", "Physics" if i % 2 else "Chemistry"] for i in range(n)]
    write_csv(root / "gpqa" / f"gpqa_{subset}.csv", rows, GPQA_HEADER)
    return rows


HLE_RECS = [
    {"id": "h1", "question": "What is 6*7?", "answer": "42", "answer_type": "exactMatch", "image": "",
     "category": "Math"},
    {"id": "h2", "question": "Which?\nAnswer Choices:\nA. x\nB. y\nC. z", "answer": "B",
     "answer_type": "multipleChoice", "image": "", "category": "Other"},
    {"id": "h3", "question": "Name the element with symbol Fe.", "answer": "Iron", "answer_type": "exactMatch",
     "image": "data:image/png;base64,iVBORw0KGgo=", "category": "Chemistry"},
]


def write_hle(root, recs=HLE_RECS):
    path = root / "hle" / "test.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))


# ------------------------------------------------------------------ MMLU


def test_mmlu_zero_shot_prompt_matches_lm_eval(tmp_path):
    items = MMLU().load(TaskOptions(data_dir=write_mmlu(tmp_path)))
    assert [it.group for it in items] == ["anatomy"] * 2 + ["high_school_physics"] * 3
    item = next(it for it in items if it.id == "high_school_physics/0")
    assert item.context == (
        "The following are multiple choice questions (with answers) about high school physics.\n\n"
        "What is 2+2? [ok]\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:"
    )
    assert item.continuations == [" A", " B", " C", " D"]
    assert item.target == "B"
    assert item.messages[-1] == {"role": "user", "content": item.context}


def test_mmlu_one_shot_prompt_uses_first_dev_example(tmp_path):
    items = MMLU().load(TaskOptions(data_dir=write_mmlu(tmp_path), shots=1))
    item = next(it for it in items if it.id == "high_school_physics/0")
    assert item.context == (
        "The following are multiple choice questions (with answers) about high school physics.\n\n"
        "Dev question one\nA. a\nB. b\nC. c\nD. d\nAnswer: B\n\n"
        "What is 2+2? [ok]\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:"
    )


def test_mmlu_limit_is_per_subject(tmp_path):
    items = MMLU().load(TaskOptions(data_dir=write_mmlu(tmp_path), limit=1))
    assert [it.id for it in items] == ["anatomy/0", "high_school_physics/0"]


def test_mmlu_missing_files_say_what_is_expected(tmp_path):
    with pytest.raises(EvalDataError, match=r"mmlu/test/<subject>_test.csv"):
        MMLU().load(TaskOptions(data_dir=tmp_path))
    with pytest.raises(EvalDataError, match="does not exist"):
        MMLU().load(TaskOptions(data_dir=tmp_path / "nope"))
    write_mmlu(tmp_path, dev={})
    with pytest.raises(EvalDataError, match=r"anatomy_dev\.csv"):
        MMLU().load(TaskOptions(data_dir=tmp_path, shots=5))


def test_mmlu_no_data_dir(monkeypatch):
    monkeypatch.delenv("OMNIMINI_DATA", raising=False)
    with pytest.raises(EvalDataError, match="--data DIR or set OMNIMINI_DATA"):
        MMLU().load(TaskOptions())


def test_mmlu_malformed_row_names_file_and_line(tmp_path):
    write_mmlu(tmp_path, rows={"anatomy": [["q", "a", "b", "c", "d", "A"], ["q", "a", "b", "c", "d", "E"]]})
    with pytest.raises(EvalDataError, match=r"anatomy_test\.csv:2: answer must be one of A-D"):
        MMLU().load(TaskOptions(data_dir=tmp_path))
    write_mmlu(tmp_path, rows={"anatomy": [["q", "a", "b", "A"]]})
    with pytest.raises(EvalDataError, match=r"anatomy_test\.csv:1: expected 6 columns"):
        MMLU().load(TaskOptions(data_dir=tmp_path))


def test_mmlu_real_data_has_57_subjects_and_14042_rows(shared_data):
    items = MMLU().load(TaskOptions(data_dir=shared_data, shots=5))
    assert len({it.group for it in items}) == 57
    assert len(items) == 14042
    assert items[0].context.count("\nAnswer:") == 6


# ------------------------------------------------------------------ MMLU-Pro, GPQA, HLE


def test_mmlu_pro_loads_up_to_ten_options(tmp_path):
    write_mmlu_pro(tmp_path)
    items = MMLUPro().load(TaskOptions(data_dir=tmp_path))
    first = items[0]
    assert first.group == "math" and first.target == "J"
    assert first.continuations[-1] == " J" and len(first.continuations) == 10
    assert "Options:\nA. o0\n" in first.context and first.context.endswith("J. o9\nAnswer:")
    assert MMLUPro().score_text(first, "... so the answer is (J).")["correct"]
    assert len(MMLUPro().load(TaskOptions(data_dir=tmp_path, limit=1))) == 2  # one per category


def test_mmlu_pro_malformed(tmp_path):
    path = tmp_path / "mmlu_pro" / "test.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text('{"question_id": 1}\n')
    with pytest.raises(EvalDataError, match=r"test\.jsonl:1: missing field\(s\) question"):
        MMLUPro().load(TaskOptions(data_dir=tmp_path))
    path.write_text('{"question_id": 1, "question": "q", "options": ["a", "b"], "answer": "C", '
                    '"category": "x"}\n')
    with pytest.raises(EvalDataError, match=r"test\.jsonl:1: answer 'C'"):
        MMLUPro().load(TaskOptions(data_dir=tmp_path))
    path.write_text('\nnot json\n')
    with pytest.raises(EvalDataError, match=r"test\.jsonl:2: not valid JSON"):
        MMLUPro().load(TaskOptions(data_dir=tmp_path))
    with pytest.raises(EvalDataError, match=r"expected .*mmlu_pro/test\.jsonl"):
        MMLUPro().load(TaskOptions(data_dir=tmp_path / "mmlu_pro"))


def test_gpqa_shuffle_is_fixed_per_question_and_balanced(tmp_path):
    write_gpqa(tmp_path, n=40)
    a = GPQA("diamond").load(TaskOptions(data_dir=tmp_path))
    b = GPQA("diamond").load(TaskOptions(data_dir=tmp_path))
    assert [(i.id, i.target, i.choices) for i in a] == [(i.id, i.target, i.choices) for i in b]
    assert len({i.target for i in a}) == 4  # the correct answer is not always in one slot
    for it in a:
        assert it.choices["ABCD".index(it.target)] == f"right{int(it.id[3:])}"
        assert it.meta["domain"] in ("Physics", "Chemistry")
    other_seed = GPQA("diamond").load(TaskOptions(data_dir=tmp_path, seed=7))
    assert [i.target for i in other_seed] != [i.target for i in a]


def test_gpqa_errors_never_contain_question_text(tmp_path):
    with pytest.raises(EvalDataError, match=r"gpqa_main\.csv"):
        GPQA("main").load(TaskOptions(data_dir=tmp_path))
    rows = write_gpqa(tmp_path, "main", n=2)
    rows[1][3] = ""
    write_csv(tmp_path / "gpqa" / "gpqa_main.csv", rows, GPQA_HEADER)
    with pytest.raises(EvalDataError) as exc:
        GPQA("main").load(TaskOptions(data_dir=tmp_path))
    assert "Incorrect Answer 1" in str(exc.value) and "Secret" not in str(exc.value)
    assert ":4:" in str(exc.value)  # the header and the multi-line explanation of row 1 count


def test_hle_loader_and_scorer(tmp_path):
    write_hle(tmp_path)
    task = HLE()
    items = task.load(TaskOptions(data_dir=tmp_path))
    assert [i.id for i in items] == ["h1", "h2", "h3"]
    assert items[2].messages[-1]["content"][1]["type"] == "image_url"
    assert task.score_text(items[0], "Explanation: 6 times 7.\nExact Answer: 42.0\nConfidence: 90%")["correct"]
    assert not task.score_text(items[0], "Exact Answer: 41")["correct"]
    assert task.score_text(items[1], "Explanation: ...\nAnswer: B. y\nConfidence: 50%")["correct"]
    assert not task.score_text(items[1], "Answer: C")["correct"]
    assert task.score_text(items[2], "Exact Answer: \\text{iron}")["correct"]
    assert normalize_answer("$\\boxed{3.50}$") == normalize_answer("3.5")


def test_hle_bad_input(tmp_path):
    with pytest.raises(EvalDataError, match=r"hle/test\.jsonl"):
        HLE().load(TaskOptions(data_dir=tmp_path))
    write_hle(tmp_path, [{"id": "x", "question": "q", "answer": "a", "answer_type": "essay"}])
    with pytest.raises(EvalDataError, match=r"test\.jsonl:1: answer_type"):
        HLE().load(TaskOptions(data_dir=tmp_path))


def test_task_registry():
    assert [t.name for t in get_tasks("gpqa,mmlu")] == ["gpqa_diamond", "mmlu"]
    assert [t.name for t in get_tasks("embodied")] == ["scene_qa", "pointing", "planning", "navigation"]
    with pytest.raises(EvalError, match="unknown task 'mmlux'"):
        get_tasks("mmlux")


# ------------------------------------------------------------------ letter extraction


@pytest.mark.parametrize("text,expected", [
    ("The answer is (C)", "C"), ("C)", "C"), ("**C**", "C"), ("Answer: C", "C"), ("C", "C"),
    ("c", None), ("(B)", "B"), ("B. Berlin", "B"), ("Answer: **D**", "D"),
    ("Let me think. Option A is wrong, option B too.\nThe correct answer is D.", "D"),
    ("A good question! I believe (B) is right.", "B"),
    ("Berlin", "C"), ("It must be Berlin, of course.", "C"), ("Paris or London", None),
    ("I don't know", None), ("", None),
])
def test_extract_letter(text, expected):
    assert extract_letter(text, ["Paris", "London", "Berlin", "Rome"]) == expected


def test_extract_letter_respects_option_count():
    assert extract_letter("The answer is (E)", n_options=4) is None
    assert extract_letter("The answer is (J)", n_options=10) == "J"


# ------------------------------------------------------------------ statistics


def test_wilson_and_normal_ci():
    lo, hi = wilson_ci(8, 10)
    assert math.isclose(lo, 0.4902, abs_tol=1e-3) and math.isclose(hi, 0.9433, abs_tol=1e-3)
    assert wilson_ci(0, 10)[0] == 0.0 and wilson_ci(0, 10)[1] > 0.2  # never a zero-width interval at 0
    lo, hi = normal_ci([0.0, 0.5, 1.0, 0.5])
    assert math.isclose((lo + hi) / 2, 0.5) and math.isclose(hi - 0.5, 1.96 * math.sqrt(1 / 6 / 4), rel_tol=1e-3)
    assert summarize([1, 0, 1, 1])["ci95"] == list(wilson_ci(3, 4))


def test_aggregate_micro_and_macro():
    outs = [{"group": "a", "score": 1.0}] * 3 + [{"group": "b", "score": 0.0}, {"group": "b", "score": None}]
    agg = aggregate(outs)
    assert agg["overall"]["n"] == 5 and math.isclose(agg["overall"]["mean"], 0.6)
    assert agg["groups"]["b"]["mean"] == 0.0 and math.isclose(agg["macro"], 0.5)
