"""`omnimini train RECIPE_OR_CONFIG`: the same command on a laptop and under `torchrun --nproc_per_node=N`."""

from __future__ import annotations

import argparse
import json
import logging
import sys


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="a recipe name (recipes/NAME.yaml, e.g. nano) or a recipe/config file "
                                  "(.yaml/.json/.toml)")
    p.add_argument("--out", help="output directory (default: the recipe's out_dir, else runs/NAME)")
    p.add_argument("--data", help="data folder for relative data paths (default: $OMNIMINI_DATA)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting: steps=10 (every training stage) or pretrain.lr=1e-3 (one stage)")
    p.add_argument("--no-resume", action="store_true", help="start over even if checkpoints exist")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run_train_cli(args) -> int:
    from omnimini.train.dist import init, shutdown
    from omnimini.train.recipe import run_recipe
    from omnimini.train.trainer import TrainError

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    overrides = list(args.set) + (["progress=false"] if args.quiet else [])
    info = init()
    try:
        results = run_recipe(args.recipe, out_dir=args.out, data_dir=args.data, overrides=overrides,
                             resume=not args.no_resume)
    except TrainError as e:  # a run that failed numerically: its checkpoints stay, the message says what to do
        print(f"omnimini train: training stopped: {e}", file=sys.stderr)
        return 1
    finally:
        shutdown()
    if info.main:
        for name, r in results.items():
            brief = {k: r.get(k) for k in ("steps", "final_loss", "val_loss", "unigram_entropy", "tok_per_s",
                                           "accuracy", "chance", "checkpoint", "tokenizer") if r.get(k) is not None}
            print(f"{name}: {json.dumps(brief)}")
    return 0


def main(argv=None) -> int:
    """`python -m omnimini.train.cli` (the torchrun entry point): bad input is one line and exit 2, as in
    `omnimini train`."""
    from omnimini.cli import USER_ERRORS, user_error_text

    p = argparse.ArgumentParser(prog="omnimini train")
    add_train_args(p)
    args = p.parse_args(argv)
    try:
        return run_train_cli(args)
    except USER_ERRORS as e:
        print(f"omnimini train: error: {user_error_text(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
