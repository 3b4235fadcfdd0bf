"""`omnimini` command line: serve | chat | generate | params | tokenizer | convert | train | eval | bench."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from omnimini.config import QUANTIZE_MODES

# errors that are the user's input, printed as one line (never a traceback)
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, NotADirectoryError,
                                                 PermissionError, KeyError)


def user_error_text(e: BaseException) -> str:
    """The one line a USER_ERRORS exception is reported as (a KeyError's message without repr quotes)."""
    return str(e.args[0] if isinstance(e, KeyError) and e.args else e)


def _load(args):
    from omnimini.runtime import load_for_inference

    return load_for_inference(args.model, quantize=getattr(args, "quantize", "none"))


# ---- params ------------------------------------------------------------------------------------------------------

def cmd_params(args) -> int:
    from omnimini.config import ModelConfig, param_counts, parse_count, preset, training_figures

    cfg = ModelConfig.load(args.preset) if args.preset.endswith(".json") else preset(args.preset)
    c = param_counts(cfg)
    tokens = parse_count(args.tokens) if args.tokens else None
    fig = training_figures(c["total_params"], tokens)
    if args.json:
        print(json.dumps({"preset": args.preset, "total_params": c["total_params"],
                          "active_params": c["active_params"], **fig,
                          "breakdown": {k: v for k, v in c.items() if k not in ("total_params", "active_params")}}))
        return 0
    kind = f"MoE {cfg.moe.num_experts} experts, top-{cfg.moe.top_k}" if cfg.moe else "dense"
    print(f"{args.preset}: {kind}, {cfg.num_layers} layers, hidden {cfg.hidden_size}, vocab {cfg.vocab_size:,}"
          + (f", vision {cfg.vision.image_size}px -> {cfg.vision.tokens_per_image} tokens" if cfg.vision else ""))
    rows = [("embeddings", c["embeddings"]), ("lm head", c["lm_head"]), ("attention (+norms)", c["attention"]),
            ("dense MLP", c["dense_mlp"]), ("routers", c["router"]), ("shared experts", c["shared_experts"]),
            ("routed experts (all)", c["experts"]), ("routed experts (active/token)", c["experts_active"]),
            ("vision encoder + projector", c["vision"])]
    for name, n in rows:
        print(f"  {name:<32}{n:>16,}")
    print(f"  {'TOTAL parameters':<32}{c['total_params']:>16,}  ({c['total_params'] / 1e9:.2f} B)")
    print(f"  {'ACTIVE parameters per token':<32}{c['active_params']:>16,}  ({c['active_params'] / 1e9:.2f} B)")
    if tokens:
        from omnimini.config import compute_verdict

        print(f"  training tokens {tokens:,}: token:param ratio {fig['token_param_ratio']:,.0f}:1 "
              f"({compute_verdict(fig['token_param_ratio'])}), ALScore {fig['alscore']:.2f}")
    return 0


# ---- generate ----------------------------------------------------------------------------------------------------

def cmd_generate(args) -> int:

    from omnimini.engine.generate import GenRequest, generate_stream
    from omnimini.engine.sampling import SamplingParams
    from omnimini.images import image_inputs, load_image
    from omnimini.tokenizer import IncrementalDecoder

    model, tok = _load(args)
    pixels, images = None, None
    if args.image:
        if model.config.vision is None:
            raise ValueError(f"--image: model {args.model or 'default'} has no vision encoder")
        images = image_inputs([load_image(p) for p in args.image], model.config.vision, tok.image_token)
        pixels = images.pixels
    if args.raw:
        ids = tok.encode_prompt(args.prompt)
        if args.image:
            raise ValueError("--image needs chat mode (drop --raw)")
    else:
        content = [{"type": "image"} for _ in args.image or []] + [{"type": "text", "text": args.prompt}]
        msgs = ([{"role": "system", "content": args.system}] if args.system else []) + \
               [{"role": "user", "content": content if args.image else args.prompt}]
        ids = tok.encode_chat(msgs, image_tokens=images.image_tokens if images else 0,
                              image_texts=images.texts if images else None)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                            max_tokens=args.max_tokens)
    dec = IncrementalDecoder(tok, skip_special=True)
    for _, t in generate_stream(model, [GenRequest(ids, params, pixels)], tok.eos_token_ids):
        sys.stdout.write(dec.push(t))
        sys.stdout.flush()
    sys.stdout.write(dec.flush() + "\n")
    return 0


# ---- tokenizer / convert / bench -------------------------------------------------------------------------------

def cmd_tokenizer_train(args) -> int:
    from omnimini.tokenizer import train_tokenizer_cli

    tok = train_tokenizer_cli(args.files, args.vocab_size, args.out)
    print(f"tokenizer with {tok.vocab_size:,} tokens written to {args.out}")
    return 0


def cmd_convert(args) -> int:
    from omnimini.weights.convert import convert

    convert(args.src, args.dst)
    print(f"converted {args.src} -> {args.dst}")
    return 0


def cmd_bench(args) -> int:
    import runpy
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "bench" / f"{args.which}.py"
    if not script.exists():
        raise FileNotFoundError(f"benchmark script not found: {script} (run from a source checkout)")
    sys.argv = [str(script), *args.rest]
    runpy.run_path(str(script), run_name="__main__")
    return 0


def cmd_chat(args) -> int:
    from omnimini.chat_cli import run_chat

    if args.endpoint:
        return run_chat(base_url=args.endpoint, model=args.endpoint_model, api_key=args.api_key,
                        system=args.system, temperature=args.temperature) or 0
    from omnimini.runtime import local_stream_fn

    if args.compile_decode:
        from omnimini.runtime import COMPILE_RETIRED

        print(COMPILE_RETIRED, file=sys.stderr)
    model, tok = _load(args)
    stream = local_stream_fn(model, tok, temperature=args.temperature)
    return run_chat(stream_fn=stream, system=args.system) or 0


# ---- parser ------------------------------------------------------------------------------------------------------

def _optional(register: Callable[[argparse._SubParsersAction], None], sub) -> None:
    """Register a subcommand whose module may be absent in a partial install; skip it quietly if so."""
    try:
        register(sub)
    except ImportError:
        pass


def _sampling_args(p):
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="omnimini", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("params", help="parameter counts of a preset (total / active) and training figures")
    p.add_argument("preset", help="preset name (nano, small, mini, ...) or a config.json")
    p.add_argument("--tokens", help="training-token budget, e.g. 13T")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_params)

    p = sub.add_parser("generate", help="generate text from a prompt (streams to the terminal)")
    p.add_argument("prompt")
    p.add_argument("--model", default=None, help="checkpoint dir, HF dir, .gguf file or model name "
                                                 "(default: the bundled default model)")
    p.add_argument("--image", action="append", help="image file to attach (repeatable)")
    p.add_argument("--system", default=None)
    p.add_argument("--raw", action="store_true", help="no chat template: continue the text as is")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--quantize", choices=QUANTIZE_MODES, default="none")
    _sampling_args(p)
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat in the terminal (in-process model or an endpoint)")
    p.add_argument("--model", default=None)
    p.add_argument("--endpoint", default=None, help="OpenAI-compatible base URL instead of a local model")
    p.add_argument("--endpoint-model", default="gpt-4o-mini")
    p.add_argument("--api-key", default=None)
    p.add_argument("--system", default=None)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--quantize", choices=QUANTIZE_MODES, default="auto")
    p.add_argument("--compile", action="store_true", dest="compile_decode", help=argparse.SUPPRESS)  # retired
    p.set_defaults(fn=cmd_chat)

    p = sub.add_parser("tokenizer", help="tokenizer tools")
    tsub = p.add_subparsers(dest="tok_command", required=True)
    t = tsub.add_parser("train", help="train a byte-level BPE tokenizer (o200k pre-tokenisation)")
    t.add_argument("files", nargs="+")
    t.add_argument("--vocab-size", type=int, required=True)
    t.add_argument("--out", default="tokenizer")
    t.set_defaults(fn=cmd_tokenizer_train)

    p = sub.add_parser("convert", help="convert a GGUF file or Hugging Face dir to an omnimini checkpoint")
    p.add_argument("src")
    p.add_argument("dst")
    p.set_defaults(fn=cmd_convert)

    p = sub.add_parser("bench", help="run a benchmark script from bench/ (peers, cpu_kernels, quant_accuracy, "
                                     "serve_load, train_speed)")
    p.add_argument("which")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(fn=cmd_bench)

    def serve(s):
        from omnimini.serve.app import add_serve_args, run_server, serve_config_from_args

        q = s.add_parser("serve", help="OpenAI-compatible API server + web chat (default: the bundled model)")
        add_serve_args(q)
        q.set_defaults(fn=lambda a: run_server(serve_config_from_args(a)) or 0)

    def train(s):
        from omnimini.train.cli import add_train_args, run_train_cli

        q = s.add_parser("train", help="train a model from a recipe or config")
        add_train_args(q)
        q.set_defaults(fn=run_train_cli)

    def evaluate(s):
        from omnimini.eval.cli import add_eval_subparser

        add_eval_subparser(s)

    for reg in (serve, train, evaluate):
        _optional(reg, sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        fn = getattr(args, "fn", None) or args.func  # eval's subparser sets `func`
        return int(fn(args) or 0)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as e:
        print(f"omnimini: error: {user_error_text(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
