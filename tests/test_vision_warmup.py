"""The recipe's `vision_warmup` stage: trains the tower alone, leaves the LM untouched, resumes, refuses bad
configs with the key named."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from omnimini.config import ConfigError
from omnimini.model import OmniModel
from omnimini.tokenizer import Tokenizer
from omnimini.train.recipe import run_recipe
from omnimini.train.vision_warmup import VisionWarmupConfig


def _recipe(init_from, steps: int, **kw) -> dict:
    return {"stages": [{"name": "warm", "type": "vision_warmup", "init_from": str(init_from), "steps": steps,
                        "batch": 4, "lr": 3e-3, "warmup_steps": 1, "save_every": 2, **kw}]}


def test_warmup_trains_the_tower_only_and_writes_a_checkpoint(tiny_ckpt, tmp_path):
    src = OmniModel.from_pretrained(tiny_ckpt / "model")
    res = run_recipe(_recipe(tiny_ckpt / "model", steps=4), out_dir=str(tmp_path / "run"))
    ck = res["warm"]["checkpoint"]
    out = OmniModel.from_pretrained(ck)
    before, after = src.state_dict(), out.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("vision.") for k in changed)
    # the tower's own layers learned, not just the projector
    assert any(k.startswith("vision.blocks.") for k in changed)
    assert (tmp_path / "run" / "warm" / "checkpoint" / "tokenizer.json").is_file()
    assert set(res["warm"]["final"]) >= {"loss", "colour_obj", "count"}


def test_warmup_resumes_from_its_checkpoint_and_skips_when_done(tiny_ckpt, tmp_path, capsys):
    run_recipe(_recipe(tiny_ckpt / "model", steps=2), out_dir=str(tmp_path / "run"))
    (tmp_path / "run" / "warm" / "report.json").unlink()  # as if stopped after the step-2 checkpoint
    run_recipe(_recipe(tiny_ckpt / "model", steps=4), out_dir=str(tmp_path / "run"))
    assert "resuming at step 2" in capsys.readouterr().err
    mtime = (tmp_path / "run" / "warm" / "report.json").stat().st_mtime
    run_recipe(_recipe(tiny_ckpt / "model", steps=4), out_dir=str(tmp_path / "run"))
    assert (tmp_path / "run" / "warm" / "report.json").stat().st_mtime == mtime


def test_bad_warmup_configs_name_the_problem(tiny_ckpt, tmp_path):
    with pytest.raises(ConfigError, match="'bacth'"):
        VisionWarmupConfig.from_dict({"init_from": "x", "bacth": 4})
    with pytest.raises(ConfigError, match="needs init_from"):
        VisionWarmupConfig.from_dict({"steps": 4})
    with pytest.raises(ConfigError, match="steps must be >= 1"):
        VisionWarmupConfig.from_dict({"init_from": "x", "steps": 0})
    m = OmniModel.from_pretrained(tiny_ckpt / "model")
    text_only = OmniModel(replace(m.config, vision=None, image_token_id=None))
    text_only.save_pretrained(tmp_path / "text", tokenizer=Tokenizer.from_dir(tiny_ckpt / "model"))
    with pytest.raises(ConfigError, match="has no vision encoder"):
        run_recipe(_recipe(tmp_path / "text", steps=2), out_dir=str(tmp_path / "run"))
