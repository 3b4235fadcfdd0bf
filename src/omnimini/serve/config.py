"""ServeConfig and its command-line flags (`omnimini serve`)."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

from omnimini.config import QUANTIZE_MODES
from omnimini.serve.limits import ServeLimits

API_KEY_ENV = "OMNIMINI_API_KEY"


@dataclass
class ServeConfig:
    # paths / names; None = the bundled default model; a (id, model, tokenizer) tuple serves an in-memory model
    models: list = field(default_factory=lambda: [None])
    aliases: dict[str, str | None] = field(default_factory=lambda: {"gpt-4o-mini": None})  # None = first model
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: list[str] = field(default_factory=list)
    quantize: str = "auto"  # a GGUF's own blocks on omnimini's kernels; other sources fbgemm fp16 (runtime.py)
    mmproj: str | None = None  # llama.cpp vision projector GGUF for the (one) model served
    max_batch: int = 16
    max_context: int | None = 2048  # per-sequence KV rows (allocated up front for every slot); capped by the model
    kv_budget_tokens: int | None = None
    prefill_chunk: int = 256
    prefix_cache_tokens: int | None = None  # KV tokens of pooled prompt prefixes (None: engine default, 0: off)
    kv_cache: str = "auto"  # KV cache dtype: auto (float16 where the decode kernel reads it) | fp16 | fp32
    limits: ServeLimits = field(default_factory=ServeLimits)
    cors_origins: list[str] = field(default_factory=list)
    allow_remote_images: bool = False
    remote_image_timeout_s: float = 10.0
    shutdown_timeout_s: float = 30.0
    log_level: str = "info"
    state_dir: str | None = None  # stored responses etc.; None: $OMNIMINI_STATE_DIR or ~/.local/share/omnimini
    batch_concurrency: int = 8  # batch lines in flight at once (background priority in the engine)

    def keys(self) -> set[str]:
        env = os.environ.get(API_KEY_ENV, "")
        return {k for k in [*self.api_keys, *env.split(",")] if k.strip()}


def _alias(text: str) -> tuple[str, str]:
    name, sep, target = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"--alias expects NAME=MODEL, got {text!r}")
    return name, target


def add_serve_args(p: argparse.ArgumentParser) -> None:
    d, lim = ServeConfig(), ServeLimits()
    p.add_argument("--model", "-m", action="append", dest="models", metavar="PATH_OR_NAME",
                   help="model to serve (repeat for several); default: the bundled default model")
    p.add_argument("--alias", action="append", type=_alias, default=[], metavar="NAME=MODEL",
                   help="extra model name clients may use (default: gpt-4o-mini=<first model>)")
    p.add_argument("--host", default=d.host, help="bind address (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=d.port)
    p.add_argument("--api-key", action="append", dest="api_keys", default=[],
                   help=f"require this bearer key (repeatable; also env {API_KEY_ENV}, comma-separated)")
    p.add_argument("--quantize", default=d.quantize, choices=QUANTIZE_MODES,
                   help="CPU weight format: auto (default: a GGUF keeps its own Q8_0/Q4_0/Q4_1 blocks on "
                        "omnimini's kernels, other models fp16), q8_0|q4_0|q4_1 (block formats), fp16, int8, none")
    p.add_argument("--mmproj", default=None, metavar="MMPROJ_GGUF",
                   help="llama.cpp vision projector file (CLIP tower + LLaVA MLP) for the GGUF --model: images "
                        "through Chat Completions")
    p.add_argument("--max-batch", type=int, default=d.max_batch, help="sequences decoded together")
    p.add_argument("--max-context", type=int, default=d.max_context, help="max tokens per sequence (KV rows)")
    p.add_argument("--kv-budget-tokens", type=int, default=None, help="KV tokens reserved at once (queue beyond)")
    p.add_argument("--prefill-chunk", type=int, default=d.prefill_chunk)
    p.add_argument("--compile", action="store_true", dest="compile_decode", help=argparse.SUPPRESS)  # retired
    p.add_argument("--prefix-cache-tokens", type=int, default=None,
                   help="KV tokens kept for automatic prompt-prefix caching, LRU (default: a quarter of the KV "
                        "budget)")
    p.add_argument("--no-prefix-cache", action="store_true", help="turn automatic prompt-prefix caching off")
    p.add_argument("--kv-cache", default=d.kv_cache, choices=("auto", "fp16", "fp32"),
                   help="KV cache dtype (default auto: float16, half the memory, where omnimini's decode kernel "
                        "reads it: quantized models on CPU; else float32)")
    p.add_argument("--max-concurrent", type=int, default=lim.max_concurrent, help="in-flight requests before 429")
    p.add_argument("--max-tokens-limit", type=int, default=lim.max_tokens, help="largest max_tokens accepted")
    p.add_argument("--max-body-bytes", type=int, default=lim.max_body_bytes)
    p.add_argument("--max-image-bytes", type=int, default=lim.max_image_bytes)
    p.add_argument("--max-image-pixels", type=int, default=lim.max_image_pixels)
    p.add_argument("--cors-origin", action="append", dest="cors_origins", default=[],
                   help="allow browser requests from this origin (CORS is off by default)")
    p.add_argument("--allow-remote-images", action="store_true", help="fetch http(s) image URLs (off by default)")
    p.add_argument("--log-level", default=d.log_level)
    p.add_argument("--state-dir", default=None, metavar="DIR",
                   help="where stored responses live (SQLite; several servers may share it); default "
                        "$OMNIMINI_STATE_DIR or ~/.local/share/omnimini")
    p.add_argument("--batch-concurrency", type=int, default=d.batch_concurrency,
                   help="Batch API lines run at once, at background priority")
    p.add_argument("--max-file-bytes", type=int, default=lim.max_file_bytes, help="largest upload to /v1/files")


def serve_config_from_args(args: argparse.Namespace) -> ServeConfig:
    if args.compile_decode:
        import sys

        from omnimini.runtime import COMPILE_RETIRED

        print(COMPILE_RETIRED, file=sys.stderr)
    lim = ServeLimits(max_body_bytes=args.max_body_bytes, max_image_bytes=args.max_image_bytes,
                      max_image_pixels=args.max_image_pixels, max_tokens=args.max_tokens_limit,
                      max_concurrent=args.max_concurrent, max_file_bytes=args.max_file_bytes)
    aliases: dict[str, str | None] = {"gpt-4o-mini": None}
    aliases.update(dict(args.alias))
    return ServeConfig(models=args.models or [None], aliases=aliases, host=args.host, port=args.port,
                       api_keys=args.api_keys, quantize=args.quantize, mmproj=args.mmproj, max_batch=args.max_batch,
                       max_context=args.max_context, kv_budget_tokens=args.kv_budget_tokens,
                       prefill_chunk=args.prefill_chunk, limits=lim,
                       prefix_cache_tokens=0 if args.no_prefix_cache else args.prefix_cache_tokens,
                       cors_origins=args.cors_origins, allow_remote_images=args.allow_remote_images,
                       log_level=args.log_level, state_dir=args.state_dir,
                       batch_concurrency=args.batch_concurrency, kv_cache=args.kv_cache)
