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


def install(checkpoint, name: str, run_report=None) -> Path:
    """Copy a trained checkpoint into the package as `name` (model + config + tokenizer, written to a temporary
    directory, then renamed), with training.json holding the tokens every stage of its recipe saw."""
    import json
    import shutil

    from omnimini.model.model import OmniModel
    from omnimini.tokenizer import Tokenizer

    if name not in PACKAGED:
        raise CheckpointError(f"{name}: not a packaged model name ({', '.join(PACKAGED)})")
    dst = ASSET_DIR / PACKAGED[name]
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    OmniModel.from_pretrained(checkpoint).save_pretrained(tmp, tokenizer=Tokenizer.from_dir(checkpoint))
    meta = {"name": name, "source": Path(checkpoint).name}  # the checkpoint it was copied from (no local paths)
    if run_report is not None:
        stages = json.loads(Path(run_report).read_text())
        meta["training_tokens"] = sum(int(s.get("tokens_seen") or 0) for s in stages.values() if isinstance(s, dict))
        meta["stages"] = {k: {f: v[f] for f in ("steps", "tokens_seen") if f in v}
                          for k, v in stages.items() if isinstance(v, dict) and "steps" in v}
    (tmp / "training.json").write_text(json.dumps(meta, indent=2) + "\n")
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
    return dst


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m omnimini.weights.packaged",
                                 description="install a trained checkpoint as a packaged model")
    ap.add_argument("source", help="a checkpoint directory, or a recipe's run directory (its --stage checkpoint, "
                                   "training tokens from its recipe_report.json)")
    ap.add_argument("name", choices=sorted(PACKAGED))
    ap.add_argument("--stage", default="sft", help="the recipe stage whose checkpoint ships (default: sft)")
    a = ap.parse_args(argv)
    import json

    src, report = Path(a.source), None
    if (src / "recipe_report.json").is_file():
        report = src / "recipe_report.json"
        stage = json.loads(report.read_text()).get(a.stage) or {}
        if not stage.get("checkpoint"):
            ap.error(f"{report}: no checkpoint for stage {a.stage!r}")
        src = Path(stage["checkpoint"])
    elif not (src / "config.json").is_file():
        ap.error(f"{src}: neither a checkpoint (config.json) nor a recipe run (recipe_report.json)")
    print(f"installed {install(src, a.name, report)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
