"""`omnimini eval ...`: run benchmarks on a local model or an endpoint; `eval compare` / `eval card`.

    omnimini eval --endpoint URL [--api-key K] [--endpoint-model NAME] --tasks mmlu,gpqa --limit 20
    omnimini eval --model DIR|NAME --tasks embodied
    omnimini eval compare RESULTS...          leaderboard with GPT-4o mini as reference
    omnimini eval card RESULTS... [--params P]  model card markdown (parameters and training tokens from the
                                                 model's config and metadata; P, a JSON file or inline JSON,
                                                 overrides them)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from omnimini.eval.errors import EvalError


def _add_run_options(p: argparse.ArgumentParser) -> None:
    src = p.add_argument_group("model (one of)")
    src.add_argument("--model", help="omnimini checkpoint directory or model name (in-process engine; "
                     "default: the default model, as `omnimini serve` serves it)")
    src.add_argument("--endpoint", help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    src.add_argument("--api-key", default=None, help="endpoint key (default: $OPENAI_API_KEY)")
    src.add_argument("--endpoint-model", default=None, help="model name sent to the endpoint")
    p.add_argument("--tasks", default=None, help="comma list: mmlu, mmlu_pro, gpqa_main, gpqa_diamond (gpqa), "
                   "hle, scene_qa, pointing, planning, navigation; groups: text, embodied")
    p.add_argument("--limit", type=int, default=None, help="items per subject/category (scene tasks: episodes)")
    p.add_argument("--shots", type=int, default=0, help="few-shot examples (MMLU: from the dev split)")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    p.add_argument("--out", default=None, help="output directory (results.json, cache.jsonl)")
    p.add_argument("--data", default=None, help="benchmark data directory (default: $OMNIMINI_DATA)")
    p.add_argument("--mode", choices=["auto", "generate", "loglik"], default="auto",
                   help="multiple-choice scoring: log-likelihood (base models) or generated letter (chat)")
    p.add_argument("--max-tokens", type=int, default=None, help="generation budget (default: per task)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    p.add_argument("--max-retries", type=int, default=4)
    p.add_argument("--seed", type=int, default=1234, help="GPQA option shuffling seed")
    p.add_argument("--image-control", default=None, metavar="blank,mismatched",
                   help="also score every image task with a blank image and/or another item's image (comma list); "
                        "the report puts them next to the real score")
    # the server's kernels by default: with the interleaved block kernels they are the faster path for batched
    # log-likelihoods too (MMLU 0-shot, 285 items, 2 threads, one run: 39 s on the GGUF's Q4_1 blocks vs 67 s
    # float32, same accuracy; 57 x 20 items: 99.5 % of letters identical to lm-evaluation-harness's float32)
    p.add_argument("--quantize", default="auto", metavar="MODE",
                   help="in-process model weights: 'auto' (default) computes as `omnimini serve` serves the model "
                        "(its kernels); 'none' float32, lm-evaluation-harness's reference; or any serve --quantize "
                        "mode")
    p.add_argument("--params", default=None, help="card: JSON file or inline JSON with total_params, ...")
    p.add_argument("--name", default=None, help="card: model name")


def add_eval_subparser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("eval", help="evaluate a model or an OpenAI-compatible endpoint",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("eval_args", nargs="*", metavar="compare|card RESULTS",
                   help="'compare RESULTS...' prints a leaderboard; 'card RESULTS...' a model card")
    _add_run_options(p)
    p.set_defaults(func=run_eval_cli)
    return p


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:80] or "model"


def make_client(args):
    from omnimini.eval import clients

    if args.model and args.endpoint:
        raise EvalError("give one of --model DIR|NAME or --endpoint URL, not both")
    if not args.endpoint:  # no --model: the default model, as `omnimini serve` serves it
        from omnimini.config import QUANTIZE_MODES

        if args.quantize not in QUANTIZE_MODES:
            raise EvalError(f"--quantize: unknown mode {args.quantize!r}; expected one of {', '.join(QUANTIZE_MODES)}")
        return clients.make_local_client(args.model, quantize=args.quantize)
    key = args.api_key or os.environ.get("OPENAI_API_KEY")
    return clients.OpenAIEndpointClient(args.endpoint, api_key=key, model=args.endpoint_model or "default",
                                        concurrency=args.concurrency, timeout=args.timeout,
                                        max_retries=args.max_retries)


def _run(args) -> int:
    from omnimini.eval.runner import RunConfig, format_summary, run
    from omnimini.eval.tasks import get_tasks

    if not args.tasks:
        raise EvalError("--tasks is required, e.g. --tasks mmlu,gpqa_diamond,scene_qa")
    if args.limit is not None and args.limit < 1:
        raise EvalError(f"--limit must be a positive number of items per subject, got {args.limit}")
    tasks = get_tasks(args.tasks)  # validate names before starting a model
    controls = _image_controls(args.image_control)
    client = make_client(args)
    label = args.endpoint_model or args.model or ("endpoint" if args.endpoint else "default")
    out = Path(args.out or Path("eval-results") / _slug(label))
    cfg = RunConfig(tasks=[t.name for t in tasks], out_dir=out, data_dir=args.data, limit=args.limit,
                    shots=args.shots, mode=args.mode, max_tokens=args.max_tokens, temperature=args.temperature,
                    concurrency=args.concurrency, seed=args.seed, image_controls=controls,
                    extra={"endpoint": args.endpoint, "model_arg": args.model})
    try:
        results = run(client, cfg, tasks)
    except KeyboardInterrupt:
        print(f"\ninterrupted: answers so far are cached in {out / 'cache.jsonl'}; rerun the same command "
              "to resume", file=sys.stderr)
        return 130
    print(format_summary(results))
    print(f"results: {out / 'results.json'}")
    return 0


def _image_controls(value: str | None) -> list[str]:
    from omnimini.eval.tasks.embodied import IMAGE_CONTROLS

    names = [v.strip() for v in (value or "").split(",") if v.strip()]
    bad = [n for n in names if n not in IMAGE_CONTROLS]
    if bad or (value is not None and not names):
        raise EvalError(f"--image-control: unknown control {bad[0] if bad else value!r}; "
                        f"expected a comma list of {', '.join(IMAGE_CONTROLS)}")
    return list(dict.fromkeys(names))


def _card(args, paths: list[str]) -> int:
    from omnimini.eval.card import build_card, params_from_model
    from omnimini.eval.compare import load_results

    results = [load_results(p) for p in paths]
    params = {}
    if args.params:  # overrides what the model's own config says
        text = Path(args.params).read_text() if Path(args.params).exists() else args.params
        try:
            params = json.loads(text)
        except ValueError as exc:
            raise EvalError(f"--params is not valid JSON: {exc}") from None
        if not isinstance(params, dict):
            raise EvalError("--params must be a JSON object (total_params, active_params, tokens, moe)")
    if "total_params" not in params:
        extra = results[0].get("config", {}).get("extra", {}) if results else {}
        if args.model is None and extra.get("endpoint"):
            raise EvalError("eval card: these results are from an endpoint; give --params (JSON with total_params, "
                            "active_params, tokens, moe) or --model (the model's checkpoint or name)")
        spec = args.model or extra.get("model_arg")  # None: the default model, as `omnimini eval` ran it
        params = {**params_from_model(spec), **params}
    print(build_card(results, params, name=args.name))
    return 0


def run_eval_cli(args) -> int:
    try:
        extra = list(args.eval_args or [])
        if extra and extra[0] == "compare":
            from omnimini.eval.compare import compare

            if len(extra) < 2:
                raise EvalError("eval compare needs at least one results.json (or run directory)")
            print(compare(extra[1:]))
            return 0
        if extra and extra[0] == "card":
            return _card(args, extra[1:])
        if extra:
            raise EvalError(f"unexpected arguments {extra}; did you mean 'eval compare RESULTS...'?")
        return _run(args)
    except (ValueError, FileNotFoundError, NotImplementedError) as exc:  # EvalError, CheckpointError, ...
        print(f"omnimini eval: error: {exc}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="omnimini")
    add_eval_subparser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
