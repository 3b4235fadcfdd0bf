"""Models shipped inside the package, served by name (`--model omnimini-nano`) with no download or training."""

from __future__ import annotations

from pathlib import Path

from omnimini.weights.checkpoint import CheckpointError

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets"
# name -> omnimini checkpoint directory under assets/ (model.safetensors, config.json, tokenizer.json)
PACKAGED = {"omnimini-nano": "omnimini-nano"}


def resolve(src):
    """`src` itself, or the directory of the packaged model it names (a path that exists always wins)."""
    if src is None or Path(str(src)).exists() or str(src).lower() not in PACKAGED:
        return src
    d = ASSET_DIR / PACKAGED[str(src).lower()]
    if not (d / "config.json").is_file():
        raise CheckpointError(f"{src}: this install does not ship it (no {d}); rebuild it with its recipe "
                              f"(README) or give a checkpoint directory")
    return str(d)
