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


def test_shipped_omnimini_nano_is_an_moe_omni_model_that_reads_its_image():
    """The shipped omnimini-nano (assets/omnimini-nano, `make omnimini-nano`): MoE with a vision encoder, under
    20 MB, and its answer distribution depends on the image (real scene vs a blank image)."""
    import torch

    from omnimini.data.scenes.tasks import EVAL_SEEDS, get_family
    from omnimini.runtime import encode_messages

    d = packaged.ASSET_DIR / "omnimini-nano"
    assert sum(f.stat().st_size for f in d.iterdir()) < 20e6
    model, tok = load_any("omnimini-nano")
    assert model.config.moe is not None and model.config.vision is not None
    ep = get_family("qa").episode(EVAL_SEEDS[0])
    msgs = [{"role": "user", "content": [{"type": "image", "image": ep.image}, {"type": "text", "text": ep.prompt}]}]
    ids, pixels = encode_messages(model, tok, msgs)
    with torch.no_grad():
        real = model(torch.tensor([ids]), pixels=pixels).logits[0, -1].log_softmax(-1)
        blank = model(torch.tensor([ids]), pixels=torch.zeros_like(pixels)).logits[0, -1].log_softmax(-1)
    assert (real.exp() - blank.exp()).abs().sum() > 0.02  # total variation between the two answer distributions


def test_omnimini_nano_served_by_name_answers_an_image_request():
    openai = pytest.importorskip("openai")
    from test_server import png_url
    from test_weights_llava import ask_served

    resp = ask_served(openai, "omnimini-nano", png_url(64, 64, (200, 30, 30)), "What colour is the shape?",
                      max_context=256)
    assert resp.model and resp.choices[0].message.content.strip()
    assert resp.usage.prompt_tokens > 16  # the image's 16 tokens are in the prompt
