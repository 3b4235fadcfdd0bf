"""Serving load benchmark: N concurrent streaming chat clients against an OpenAI-compatible server.

Reports, per concurrency level: time to first token (p50/p99), inter-token latency (mean gap between streamed
content chunks, p50/p99), and aggregate output tokens/s (completion tokens from the usage chunk / wall time).

    python bench/serve_load.py --url http://127.0.0.1:8000 --model gpt-4o-mini     # a running server
    python bench/serve_load.py --serve-model PATH --concurrency 1 4 16                # starts `omnimini serve`
    python bench/serve_load.py --random-preset nano                                   # random weights, no download

Shared-prefix scenario (prompt caching): every request carries the same ~N-token system prompt and its own
question; `--prefix-cache-ab` runs each level on a server with the prefix cache and on one started with
`--no-prefix-cache`, and prints both tables and their ratios:

    python bench/serve_load.py --system-tokens 2000 --concurrency 16 --prefix-cache-ab --server-arg=--max-context=2560
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

PROMPT = "Write a short story about a robot who learns to paint. Use simple words."
SYSTEM_WORDS = ("You are the support assistant of a hardware shop. Policies: returns within thirty days with a "
                "receipt; store credit without one; no returns on cut timber, mixed paint or custom keys. Opening "
                "hours differ on public holidays. Always greet the customer, answer briefly, never invent prices, and "
                "refer safety questions about electrical work to a licensed electrician.").split()


@dataclass
class Sample:
    ttft: float = 0.0
    gaps: list[float] = field(default_factory=list)
    tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    ok: bool = False


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def system_prompt(words: int) -> str:
    """A deterministic system prompt of `words` words (numbered sections, so it is not one repeated sentence)."""
    out = []
    for i in range(words):
        if i % len(SYSTEM_WORDS) == 0:
            out.append(f"Section {i // len(SYSTEM_WORDS) + 1}.")
        out.append(SYSTEM_WORDS[i % len(SYSTEM_WORDS)])
    return " ".join(out)


def messages(system: str | None, seed: int) -> list[dict]:
    if system is None:
        return [{"role": "user", "content": PROMPT}]
    # the shared system prompt, then a question of each request's own
    return [{"role": "system", "content": system}, {"role": "user", "content": f"{PROMPT} Customer number {seed}."}]


async def one_request(client: httpx.AsyncClient, model: str, max_tokens: int, seed: int,
                      system: str | None = None) -> Sample:
    s = Sample()
    body = {"model": model, "messages": messages(system, seed), "max_tokens": max_tokens,
            "stream": True, "stream_options": {"include_usage": True}, "temperature": 0.8, "seed": seed}
    t0 = time.perf_counter()
    last = None
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return s
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if obj.get("usage"):
                use = obj["usage"]
                s.tokens, s.prompt_tokens = use["completion_tokens"], use["prompt_tokens"]
                s.cached_tokens = (use.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
            for ch in obj.get("choices", []):
                if ch.get("delta", {}).get("content"):
                    now = time.perf_counter()
                    if last is None:
                        s.ttft = now - t0
                    else:
                        s.gaps.append(now - last)
                    last = now
    s.ok = last is not None
    return s


async def run_level(url: str, model: str, concurrency: int, per_client: int, max_tokens: int, key: str | None,
                    system: str | None = None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=1800, limits=limits) as client:
        await one_request(client, model, 4, 0, system)  # warm-up (with a system prompt: it is then seen before)

        async def worker(w: int) -> list[Sample]:
            return [await one_request(client, model, max_tokens, w * 1000 + i + 1, system) for i in range(per_client)]

        t0 = time.perf_counter()
        results = await asyncio.gather(*(worker(w) for w in range(concurrency)))
        wall = time.perf_counter() - t0
    samples = [s for rs in results for s in rs if s.ok]
    ttft = [s.ttft for s in samples]
    itl = [g for s in samples for g in s.gaps]
    toks = sum(s.tokens for s in samples)
    return {"concurrency": concurrency, "requests": len(samples), "ttft_p50_ms": 1000 * pct(ttft, 50),
            "ttft_p99_ms": 1000 * pct(ttft, 99), "itl_mean_ms": 1000 * (statistics.fmean(itl) if itl else 0),
            "itl_p50_ms": 1000 * pct(itl, 50), "itl_p99_ms": 1000 * pct(itl, 99), "output_tokens": toks,
            "wall_s": wall, "output_tok_per_s": toks / wall if wall else 0.0,
            "prompt_tokens_mean": statistics.fmean(s.prompt_tokens for s in samples) if samples else 0.0,
            "cached_tokens_mean": statistics.fmean(s.cached_tokens for s in samples) if samples else 0.0}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def random_checkpoint(preset_name: str, out: Path) -> Path:
    """Random weights of a preset + a tokenizer trained on a little text: measures the engine, not quality."""
    import torch

    from omnimini.config import preset
    from omnimini.model import OmniModel
    from omnimini.tokenizer import Tokenizer

    cfg = preset(preset_name)
    corpus = out / "corpus.txt"
    words = (PROMPT + " the of and to in is was for on that with as by at from this be have or are it").split()
    corpus.write_text("\n".join(" ".join(words[(i * 7 + j) % len(words)] for j in range(12)) for i in range(3000)))
    tok = Tokenizer.train([corpus], vocab_size=min(cfg.vocab_size, 1024), show_progress=False)
    cfg.vocab_size = max(cfg.vocab_size, tok.vocab_size)
    if cfg.vision is not None:
        cfg.image_token_id = tok.image_token_id
    torch.manual_seed(0)
    OmniModel(cfg).save_pretrained(out / "model", tokenizer=tok)
    return out / "model"


def start_server(model: str | None, port: int, max_batch: int, extra: list[str]) -> subprocess.Popen:
    args = ["serve", "--port", str(port), "--max-batch", str(max_batch), "--max-concurrent", "1024",
            "--log-level", "warning", *extra]
    if model:
        args += ["--model", model]
    code = "import sys; from omnimini.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, *args])
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with code {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise SystemExit("server did not become healthy within 600 s")


def table(rows: list[dict]) -> str:
    head = ("| server | concurrency | requests | prompt tok (cached) | TTFT p50 (ms) | TTFT p99 (ms) | ITL mean (ms) "
            "| ITL p99 (ms) | output tok/s |\n|---|---|---|---|---|---|---|---|---|")
    lines = [f"| {r.get('server', '')} | {r['concurrency']} | {r['requests']} | {r['prompt_tokens_mean']:.0f} "
             f"({r['cached_tokens_mean']:.0f}) | {r['ttft_p50_ms']:.0f} | {r['ttft_p99_ms']:.0f} | "
             f"{r['itl_mean_ms']:.1f} | {r['itl_p99_ms']:.1f} | {r['output_tok_per_s']:.1f} |" for r in rows]
    return "\n".join([head, *lines])


def ratios(rows: list[dict]) -> str:
    """Cached vs uncached at each concurrency (TTFT: uncached / cached, so > 1 means caching is faster)."""
    out = []
    for c in sorted({r["concurrency"] for r in rows}):
        on = next((r for r in rows if r["concurrency"] == c and r["server"] == "prefix cache"), None)
        off = next((r for r in rows if r["concurrency"] == c and r["server"] == "no prefix cache"), None)
        if on and off and on["ttft_p50_ms"] and on["output_tok_per_s"]:
            out.append(f"concurrency {c}: TTFT p50 {off['ttft_p50_ms'] / on['ttft_p50_ms']:.1f}x lower, "
                       f"p99 {off['ttft_p99_ms'] / on['ttft_p99_ms']:.1f}x lower, output tok/s "
                       f"{on['output_tok_per_s'] / off['output_tok_per_s']:.2f}x with the prefix cache")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="a running server (default: start one)")
    p.add_argument("--model", default="gpt-4o-mini", help="model name sent in requests")
    p.add_argument("--serve-model", help="model path/name for the self-started server (default: bundled model)")
    p.add_argument("--random-preset", help="self-start on random weights of this preset (e.g. nano)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests-per-client", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--server-arg", action="append", default=[], help="extra `omnimini serve` flag (repeatable)")
    p.add_argument("--api-key", default=os.environ.get("OMNIMINI_API_KEY"))
    p.add_argument("--system-tokens", type=int, default=0,
                   help="shared-prefix scenario: every request starts with the same system prompt of ~N tokens")
    p.add_argument("--prefix-cache-ab", action="store_true",
                   help="run on a self-started server with the prefix cache, then on one with --no-prefix-cache")
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args(argv)
    if a.prefix_cache_ab and a.url:
        p.error("--prefix-cache-ab starts its own servers; leave out --url")
    tmp = tempfile.TemporaryDirectory()
    servers = [("prefix cache", []), ("no prefix cache", ["--no-prefix-cache"])] if a.prefix_cache_ab else [("", [])]
    rows = []
    try:
        model = a.serve_model
        if a.random_preset and not a.url:
            model = str(random_checkpoint(a.random_preset, Path(tmp.name)))
        for label, flags in servers:
            rows += run_server_levels(a, model, label, flags)
        print(table(rows))
        if a.prefix_cache_ab:
            print(ratios(rows))
        if a.json:
            Path(a.json).write_text(json.dumps(rows, indent=2) + "\n")
    finally:
        tmp.cleanup()
    return 0


def run_server_levels(a, model: str | None, label: str, flags: list[str]) -> list[dict]:
    """Every concurrency level against `a.url`, or against a server started here with `flags` added."""
    proc, url = None, a.url
    try:
        if url is None:
            port = free_port()
            proc = start_server(model, port, a.max_batch, [*a.server_arg, *flags])
            url = f"http://127.0.0.1:{port}"
        system = None
        if a.system_tokens:
            system = asyncio.run(calibrated_system_prompt(url, a.model, a.system_tokens, a.api_key))
        rows = []
        for c in a.concurrency:
            row = asyncio.run(run_level(url, a.model, c, a.requests_per_client, a.max_tokens, a.api_key, system))
            rows.append({"server": label, **row})
            print(json.dumps(rows[-1]), flush=True)
        return rows
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)


async def calibrated_system_prompt(url: str, model: str, tokens: int, key: str | None) -> str:
    """A system prompt of about `tokens` tokens in the served model's tokenizer (one measuring request)."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600) as client:
        words = max(1, int(tokens * 0.7))  # English runs ~1.3 tokens a word in BPE vocabularies
        for _ in range(2):
            body = {"model": model, "messages": messages(system_prompt(words), 0), "max_tokens": 1}
            r = await client.post("/v1/chat/completions", json=body)
            if r.status_code != 200:
                raise SystemExit(f"calibrating the system prompt failed: HTTP {r.status_code} {r.text[:300]}")
            got = r.json()["usage"]["prompt_tokens"] - 30  # less the template and the question
            words = max(1, round(words * tokens / max(got, 1)))
    return system_prompt(words)


if __name__ == "__main__":
    sys.exit(main())
