"""Models shipped inside the package load by name; a name whose files are missing gets a clear error."""

from __future__ import annotations

import shutil

import pytest

from omnimini.weights import packaged
from omnimini.weights.checkpoint import CheckpointError
from omnimini.weights.convert import detect, load_any


def test_a_packaged_name_loads_its_directory(tiny_ckpt, tmp_path, monkeypatch):
    shutil.copytree(tiny_ckpt / "model", tmp_path / "omnimini-nano")
    monkeypatch.setattr(packaged, "ASSET_DIR", tmp_path)
    assert detect("omnimini-nano") == "omnimini"
    model, tok = load_any("OMNIMINI-NANO")
    assert model.vision is not None and tok.image_token_id is not None
    # a path that exists wins over the name
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    shutil.copytree(tiny_ckpt / "model", tmp_path / "here" / "omnimini-nano")
    assert packaged.resolve("omnimini-nano") == "omnimini-nano"


def test_a_packaged_name_without_its_files_names_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(packaged, "ASSET_DIR", tmp_path)
    with pytest.raises(CheckpointError, match="omnimini-nano: this install does not ship it"):
        load_any("omnimini-nano")


def test_install_copies_a_recipe_run_with_its_training_tokens(tiny_ckpt, tmp_path, monkeypatch):
    import json

    monkeypatch.setattr(packaged, "ASSET_DIR", tmp_path / "assets")
    run = tmp_path / "run"
    run.mkdir()
    report = {"tokenizer": {"tokenizer": "x"}, "pretrain": {"steps": 3, "tokens_seen": 1000},
              "sft": {"steps": 2, "tokens_seen": 250, "checkpoint": str(tiny_ckpt / "model")},
              "eval_qa": {"accuracy": 0.5}}
    (run / "recipe_report.json").write_text(json.dumps(report))
    assert packaged.main([str(run), "omnimini-nano"]) == 0
    meta = json.loads((tmp_path / "assets" / "omnimini-nano" / "training.json").read_text())
    assert meta["training_tokens"] == 1250 and set(meta["stages"]) == {"pretrain", "sft"}
    model, _ = load_any("omnimini-nano")
    assert model.vision is not None
    with pytest.raises(SystemExit):
        packaged.main([str(tmp_path / "nothing"), "omnimini-nano"])
