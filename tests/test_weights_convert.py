"""convert / load_any / the cached default model."""

import pytest
import torch

pytest.importorskip("transformers")

from test_weights_gguf import tiny_llama, write_gguf  # noqa: E402
from test_weights_hf import _save  # noqa: E402

from omnimini.weights import default as default_mod  # noqa: E402
from omnimini.weights.checkpoint import CheckpointError  # noqa: E402
from omnimini.weights.convert import convert, detect, load_any  # noqa: E402


def _same(a, b):
    ids = torch.arange(3, 30)[None]
    with torch.no_grad():
        torch.testing.assert_close(a(ids).logits, b(ids).logits, atol=0, rtol=0)


def test_convert_hf_and_gguf_roundtrip(tmp_path):
    hf_dir, gguf_file = tmp_path / "hf", tmp_path / "m.gguf"
    hf_dir.mkdir()
    _save(hf_dir, "qwen3_moe")
    write_gguf(gguf_file, tiny_llama())
    assert detect(hf_dir) == "hf" and detect(gguf_file) == "gguf" and detect(None) == "default"
    for src in (hf_dir, gguf_file):
        dst = tmp_path / f"out-{src.name}"
        convert(src, dst)
        assert detect(dst) == "omnimini"
        (m1, t1), (m2, t2) = load_any(src), load_any(dst)
        _same(m1, m2)
        assert t1.eos_token_ids == t2.eos_token_ids and t1.chat_template == t2.chat_template
        assert t1.encode("hello <|im_end|>") == t2.encode("hello <|im_end|>")


def test_bad_sources(tmp_path):
    with pytest.raises(CheckpointError, match="model not found"):
        load_any(tmp_path / "nope")
    (tmp_path / "x.bin").write_bytes(b"\0" * 10)
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        load_any(tmp_path / "x.bin")
    with pytest.raises(CheckpointError, match="no config.json"):
        load_any(tmp_path)


def test_default_model_is_converted_once_and_cached(tmp_path, monkeypatch, capsys):
    src = tmp_path / "small.gguf"
    write_gguf(src, tiny_llama())  # stands in for the 100 MB SmolLM2 file: same code path, fast
    monkeypatch.setattr(default_mod, "default_gguf", lambda: src)
    monkeypatch.setenv("OMNIMINI_CACHE", str(tmp_path / "cache"))
    d = default_mod.default_model_dir()
    assert d.parent == tmp_path / "cache" / "models" and (d / default_mod.MARKER).exists()
    assert "converting" in capsys.readouterr().err
    mtime = (d / "model.safetensors").stat().st_mtime_ns
    assert default_mod.default_model_dir() == d
    assert "from cache" in capsys.readouterr().err
    assert (d / "model.safetensors").stat().st_mtime_ns == mtime
    (d / default_mod.MARKER).unlink()  # as if the first conversion had been interrupted
    default_mod.default_model_dir()
    assert "converting" in capsys.readouterr().err and (d / default_mod.MARKER).exists()
    model, tok = load_any("SmolLM2-135M-Instruct")
    assert model.config.num_layers == 2 and tok.eos_token_ids == [2]
