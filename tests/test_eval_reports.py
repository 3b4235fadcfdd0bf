"""Embodied adapters end to end (oracle and multi-turn navigation), model card, leaderboard, CLI."""

import hashlib
import json

import pytest
from test_eval_tasks import write_mmlu

from omnimini.eval.card import build_card
from omnimini.eval.cli import main as eval_main
from omnimini.eval.clients import InProcessClient
from omnimini.eval.compare import compare
from omnimini.eval.errors import EvalDataError
from omnimini.eval.reference import alscore, ratio_verdict
from omnimini.eval.runner import RunConfig, run, write_results
from omnimini.eval.tasks import get_tasks
from omnimini.eval.tasks.base import TaskOptions


def _key(message):
    img = next(p["image"] for p in message["content"] if p["type"] == "image")
    text = next(p["text"] for p in message["content"] if p["type"] == "text")
    return hashlib.sha256(img.tobytes()).hexdigest() + text


def test_embodied_oracle_scores_full_marks_and_reports_subscores():
    pytest.importorskip("omnimini.data.scenes.navigation")
    tasks = get_tasks("embodied")
    answers = {_key(it.messages[0]): it.target for t in tasks for it in t.load(TaskOptions(limit=6))}
    oracle = InProcessClient(lambda batch, p: [answers[_key(m[0])] for m in batch], model_id="oracle")
    res = run(oracle, RunConfig(tasks=[t.name for t in tasks], limit=6), tasks)
    for name, tr in res["tasks"].items():
        assert tr["n_items"] == 6 and tr["n_failed"] == 0, name
        assert tr["metrics"]["overall"]["mean"] == 1.0, name
    assert res["tasks"]["navigation"]["metrics"]["spl"]["mean"] == 1.0
    assert "by_qtype" in res["tasks"]["scene_qa"]["metrics"]
    assert set(res["tasks"]["planning"]["metrics"]["groups"]) <= {
        "base", "common_sense", "complex", "visual", "spatial", "long_horizon"}
    assert all(i["seed"] >= 10_000_000 for i in res["tasks"]["planning"]["items"])  # evaluation seeds


def test_navigation_is_multi_turn():
    pytest.importorskip("omnimini.data.scenes.navigation")
    task = get_tasks("navigation")[0]
    items = task.load(TaskOptions(limit=3))
    plans = {_key(it.messages[0]): it.target.splitlines() for it in items}

    def one_action_per_turn(batch, params):
        out = []
        for msgs in batch:
            done = sum(1 for m in msgs if m["role"] == "assistant")
            out.append(plans[_key(msgs[0])][done])
        return out

    res = run(InProcessClient(one_action_per_turn, model_id="stepper"), RunConfig(tasks=["navigation"], limit=3),
              [task])
    tr = res["tasks"]["navigation"]
    assert tr["metrics"]["overall"]["mean"] == 1.0
    assert all(i["turns"] == len(plans[_key(it.messages[0])]) for i, it in zip(tr["items"], items, strict=True))
    assert max(i["turns"] for i in tr["items"]) > 1


def fake_results(tmp_path, model, scores):
    """A results.json with the given {task: fraction} (n = 100 items each)."""
    tasks = {}
    for name, frac in scores.items():
        k = round(100 * frac)
        outcomes = [{"group": "g", "score": 1.0}] * k + [{"group": "g", "score": 0.0}] * (100 - k)
        task = get_tasks(name)[0]
        tasks[task.name] = {"metrics": task.aggregate(outcomes), "n_items": 100, "n_failed": 0,
                            "timing": {"items_per_s": 1.0}, "items": []}
    path = tmp_path / model / "results.json"
    write_results({"model": model, "config": {"shots": 5}, "tasks": tasks}, path)
    return path


def test_alscore_and_ratio_verdict():
    assert alscore(8, 13_000) == pytest.approx(1.075, abs=1e-3)
    assert ratio_verdict(1625).startswith("beyond compute-optimal")
    assert ratio_verdict(20).startswith("about compute-optimal")
    assert ratio_verdict(2).startswith("under-trained")


def test_model_card_has_gpt4o_mini_sections(tmp_path):
    path = fake_results(tmp_path, "omni-tiny", {"mmlu": 0.3, "gpqa_diamond": 0.25, "scene_qa": 0.5,
                                                 "navigation": 0.2})
    card = build_card(json.loads(path.read_text()),
                      {"total_params": 120e6, "active_params": 40e6, "tokens": 2.4e9, "moe": True})
    for section in ("# omni-tiny", "## Overview", "## Model", "## Benchmarks", "## Embodied"):
        assert section in card
    assert "| Type | MoE (mixture of experts) |" in card
    assert "| Total parameters | 120M (120,000,000) |" in card and "40M" in card
    assert "| Token:param ratio | 20:1 — about compute-optimal" in card
    assert f"| ALScore | {alscore(0.12, 2.4):.4f}" in card
    assert "| MMLU | 30.0 [" in card and "| 100 | 5 | 82.0 |" in card
    assert "| GPQA (diamond) | 25.0 [" in card and "| 40.2 |" in card
    assert "| MMLU-Pro | not run |" in card and "| HLE | not run |" in card
    assert "| Scene QA | 50.0 [" in card and "| Planning | not run |" in card


def test_compare_leaderboard_includes_reference_row(tmp_path):
    a = fake_results(tmp_path, "model-a", {"mmlu": 0.5, "scene_qa": 0.7})
    b = fake_results(tmp_path, "model-b", {"mmlu": 0.9, "gpqa_diamond": 0.3})
    table = compare([a, b.parent])  # a run directory works as well as its results.json
    lines = table.splitlines()
    assert lines[0].startswith("| Model | MMLU | MMLU-Pro | GPQA | HLE | Scene QA |")
    rows = [ln for ln in lines[2:] if ln.startswith("| ")]
    assert [r.split(" | ")[0] for r in rows] == ["| model-b", "| gpt-4o-mini (published)", "| model-a"]
    assert "| gpt-4o-mini (published) | 82.0 | — | 40.2 | — | — | — | — | — | 24.0 | 32.7 | 33.3 |" in table
    assert "| model-a | 50.0 | — | — | — | 70.0 |" in table
    with pytest.raises(EvalDataError, match="results file not found"):
        compare([tmp_path / "missing.json"])


def test_cli_compare_card_and_errors(tmp_path, capsys):
    a = fake_results(tmp_path, "model-a", {"mmlu": 0.5})
    assert eval_main(["eval", "compare", str(a)]) == 0
    assert "gpt-4o-mini (published)" in capsys.readouterr().out
    params = json.dumps({"total_params": 1e9, "active_params": 1e9, "tokens": 1e12, "moe": False})
    assert eval_main(["eval", "card", str(a), "--params", params, "--name", "mine"]) == 0
    out = capsys.readouterr().out
    assert "# mine" in out and "| Type | dense |" in out
    assert eval_main(["eval", "--tasks", "mmlu", "--model", "x", "--endpoint", "http://127.0.0.1:1/v1"]) == 2
    assert "not both" in capsys.readouterr().err
    assert eval_main(["eval", "--model", "x", "--tasks", "mmlu"]) == 2
    assert "model not found: x" in capsys.readouterr().err
    assert eval_main(["eval", "--endpoint", "http://127.0.0.1:9", "--tasks", "nope"]) == 2
    assert "unknown task" in capsys.readouterr().err


def test_cli_missing_data_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("OMNIMINI_DATA", raising=False)
    rc = eval_main(["eval", "--endpoint", "http://127.0.0.1:9", "--tasks", "mmlu", "--out", str(tmp_path / "o"),
                    "--data", str(tmp_path)])
    assert rc == 2 and "mmlu/test/<subject>_test.csv" in capsys.readouterr().err


def test_cli_endpoint_run_writes_results(tmp_path, capsys):
    write_mmlu(tmp_path / "data")
    # an endpoint that refuses connections: every item fails, but the run completes and reports it
    rc = eval_main(["eval", "--endpoint", "http://127.0.0.1:9/v1", "--tasks", "mmlu", "--limit", "1",
                    "--max-retries", "0", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "o")])
    assert rc == 0
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    assert res["tasks"]["mmlu"]["n_items"] == 2 and res["tasks"]["mmlu"]["n_failed"] == 2
    assert "results:" in capsys.readouterr().out


def test_image_controls_score_the_same_items_with_a_blank_and_a_mismatched_image(capsys):
    """An oracle that reads the answer off the image scores 1.0 with the real image and drops with the controls,
    whose rows sit next to the real score in the summary; a text task has no control rows."""
    from omnimini.eval.runner import format_summary

    tasks = get_tasks("scene_qa,shapes")
    answers = {}
    for t in tasks:
        for it in t.load(TaskOptions(limit=12)):
            answers[_key(it.messages[0])] = it.target
    # unknown (image, question) pairs, i.e. control images, get an answer that is never right
    oracle = InProcessClient(lambda batch, p: [answers.get(_key(m[0]), "I cannot tell") for m in batch],
                             model_id="image-oracle")
    res = run(oracle, RunConfig(tasks=[t.name for t in tasks], limit=12, image_controls=["blank", "mismatched"]),
              tasks)
    for name in ("scene_qa", "shapes"):
        tr = res["tasks"][name]
        assert tr["metrics"]["overall"]["mean"] == 1.0
        assert set(tr["controls"]) == {"blank", "mismatched"}
        for ctl in tr["controls"].values():
            assert ctl["n_items"] == 12 and ctl["metrics"]["overall"]["mean"] == 0.0
            assert all(i["image_control"] in ("blank", "mismatched") for i in ctl["items"])
    text = format_summary(res)
    assert "blank image (gap +100.0)" in text and "mismatched image (gap +100.0)" in text


def test_image_control_items_change_only_the_image():
    task = get_tasks("scene_qa")[0]
    items = task.load(TaskOptions(limit=3))
    blank = task.with_image_control(items, "blank")
    mism = task.with_image_control(items, "mismatched")
    for i, (a, b, m) in enumerate(zip(items, blank, mism, strict=True)):
        img = lambda it: it.messages[0]["content"][0]["image"]  # noqa: E731
        txt = lambda it: it.messages[0]["content"][1]["text"]  # noqa: E731
        assert txt(a) == txt(b) == txt(m) and a.target == b.target == m.target
        assert img(b).getextrema() == tuple((v, v) for v in img(b).getpixel((0, 0)))  # one colour: nothing to see
        assert img(m).tobytes() == img(items[(i + 1) % 3]).tobytes()
    assert get_tasks("mmlu")[0].with_image_control([], "blank") is None
    with pytest.raises(Exception, match="unknown image control"):
        task.with_image_control(items, "noise")


def test_eval_cli_rejects_an_unknown_image_control(capsys):
    assert eval_main(["eval", "--model", "x", "--tasks", "scene_qa", "--image-control", "noise"]) == 2
    assert "--image-control" in capsys.readouterr().err


def test_card_takes_parameters_and_tokens_from_the_model(tmp_path, tiny_ckpt, capsys):
    """Without --params the card reads the model named in the results (or --model): its MoE config's total and
    active counts, and its training tokens from training.json; --params overrides single keys."""
    import shutil

    from omnimini.config import param_counts
    from omnimini.model import OmniModel

    model_dir = tmp_path / "m"
    shutil.copytree(tiny_ckpt / "model", model_dir)
    (model_dir / "training.json").write_text(json.dumps({"training_tokens": 3.5e6}))
    a = fake_results(tmp_path, "tiny", {"mmlu": 0.5})
    res = json.loads(a.read_text())
    res["config"]["extra"] = {"endpoint": None, "model_arg": str(model_dir)}
    a.write_text(json.dumps(res))
    c = param_counts(OmniModel.from_pretrained(model_dir).config)
    assert c["active_params"] < c["total_params"]  # a real MoE: the card must tell them apart
    assert eval_main(["eval", "card", str(a)]) == 0
    out = capsys.readouterr().out
    assert "| Type | MoE (mixture of experts) |" in out
    assert f"({c['total_params']:,})" in out and f"({c['active_params']:,})" in out
    assert "| Training tokens | 3.5M |" in out
    assert eval_main(["eval", "card", str(a), "--params", '{"tokens": 7e6}']) == 0
    assert "| Training tokens | 7M |" in capsys.readouterr().out
    # results from an endpoint name no model: the card asks for one
    res["config"]["extra"] = {"endpoint": "http://127.0.0.1:9/v1", "model_arg": None}
    a.write_text(json.dumps(res))
    assert eval_main(["eval", "card", str(a)]) == 2
    assert "give --params" in capsys.readouterr().err
