"""One entry point for every weight source: omnimini dirs, Hugging Face dirs, GGUF files, the default model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from omnimini.weights.checkpoint import CheckpointError, load_model

KINDS = ("omnimini", "hf", "gguf", "default")


def detect(src) -> str:
    """What `src` is: 'gguf' (file), 'hf' or 'omnimini' (directory), or 'default' (the default model's name)."""
    from omnimini.weights.default import is_default_name
    from omnimini.weights.packaged import resolve

    src = resolve(src)
    if src is None or (not Path(src).exists() and is_default_name(str(src))):
        return "default"
    p = Path(src)
    if p.is_file():
        with p.open("rb") as f:
            if f.read(4) == b"GGUF":
                return "gguf"
        raise CheckpointError(f"{p}: not a GGUF file (a model is a .gguf file or a checkpoint directory)")
    if not p.is_dir():
        raise CheckpointError(f"model not found: {src} (give a .gguf file, a model directory, or "
                              f"the default model's name)")
    cfg = p / "config.json"
    if not cfg.is_file():
        raise CheckpointError(f"{p}: no config.json (not an omnimini or Hugging Face model directory)")
    try:
        d = json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg}: not valid JSON ({e})") from None
    return "hf" if "model_type" in d else "omnimini"


def load_omnimini(path, device="cpu", dtype=torch.float32):
    from omnimini.tokenizer import Tokenizer
    from omnimini.weights.hf import check_vocab

    model = load_model(path, device, dtype)
    if not (Path(path) / "tokenizer.json").is_file():
        raise CheckpointError(f"{path}: checkpoint has no tokenizer.json")
    tok = Tokenizer.from_dir(path)
    check_vocab(tok, model.config, str(path))
    return model, tok


def with_default_vision(path_or_name, model, tok, in_place: bool = False):
    """The default text model as loaded, turned into omnimini-vl (its shipped vision weights attached) when
    `path_or_name` asks for the default with vision; anything else comes back unchanged."""
    from omnimini.weights.default import wants_vision

    if detect(path_or_name) != "default" or not wants_vision(path_or_name):
        return model, tok
    from omnimini.vl.spec import load_vl

    return load_vl(model, tok, in_place=in_place)


def load_any(path_or_name=None, device="cpu", dtype=torch.float32):
    """(OmniModel, Tokenizer) from an omnimini dir, an HF dir, a .gguf file, a packaged model's name or the default
    model's name/None."""
    from omnimini.weights.packaged import resolve

    path_or_name = resolve(path_or_name)
    kind = detect(path_or_name)
    if kind == "default":
        from omnimini.weights.default import default_model_dir

        return with_default_vision(path_or_name, *load_omnimini(default_model_dir(), device, dtype))
    if kind == "gguf":
        from omnimini.weights.gguf_loader import load_gguf

        return load_gguf(path_or_name, device, dtype)
    if kind == "hf":
        from omnimini.weights.hf import load_hf

        return load_hf(path_or_name, device, dtype)
    return load_omnimini(path_or_name, device, dtype)


def convert(src, dst) -> Path:
    """`omnimini convert SRC DST`: any supported source -> an omnimini checkpoint directory (float32)."""
    kind = detect(src)
    print(f"omnimini: reading {kind} model {src or 'default'}", file=sys.stderr)
    model, tok = load_any(src)
    out = Path(dst)
    if out.exists() and any(out.iterdir()) and not (out / "config.json").exists():
        raise CheckpointError(f"{out}: exists and is not empty; refusing to write a checkpoint into it")
    model.save_pretrained(out, tokenizer=tok)
    n = model.num_params()
    print(f"omnimini: wrote {out} ({n / 1e6:.1f}M parameters, arch {model.config.arch})", file=sys.stderr)
    return out
