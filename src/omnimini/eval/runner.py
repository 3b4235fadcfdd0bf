"""Runs tasks over a client: cached requests, bounded concurrency, tqdm progress, results.json."""

from __future__ import annotations

import asyncio
import json
import platform
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from tqdm import tqdm

from omnimini.eval.cache import ResponseCache, cache_key
from omnimini.eval.clients import ChatResult, Client
from omnimini.eval.errors import EvalError
from omnimini.eval.tasks import get_tasks
from omnimini.eval.tasks.base import EvalItem, Task, TaskOptions

RESPONSE_KEEP_CHARS = 4000  # enough to audit letter extraction without bloating results.json


@dataclass
class RunConfig:
    tasks: list[str]
    out_dir: Path | None = None
    data_dir: Path | None = None
    limit: int | None = None
    shots: int = 0
    mode: str = "auto"  # auto | generate | loglik
    max_tokens: int | None = None
    temperature: float = 0.0
    concurrency: int = 8
    seed: int = 1234
    image_controls: list[str] = field(default_factory=list)  # "blank" / "mismatched": image tasks scored again
    extra: dict = field(default_factory=dict)  # anything the CLI wants recorded (endpoint URL...)

    def task_options(self) -> TaskOptions:
        return TaskOptions(data_dir=self.data_dir, limit=self.limit, shots=self.shots, mode=self.mode,
                           max_tokens=self.max_tokens, seed=self.seed)


class RunContext:
    """What a task sees while running an item: cached chat / log-likelihood and usage accounting."""

    def __init__(self, client: Client, cache: ResponseCache, task: Task, cfg: RunConfig):
        self.client, self.cache, self.task, self.cfg = client, cache, task, cfg
        self.mode = cfg.mode
        self.max_tokens = cfg.max_tokens
        self.client_supports_loglik = bool(getattr(client, "supports_loglikelihood", False))
        self.usage: dict[str, dict] = {}
        self.requests = 0

    def _add_usage(self, item: EvalItem, usage: dict) -> None:
        acc = self.usage.setdefault(item.id, {"prompt_tokens": 0, "completion_tokens": 0})
        for k in acc:
            acc[k] += int(usage.get(k) or 0)

    async def chat(self, item: EvalItem, messages: list[dict], **params) -> ChatResult:
        params = {"temperature": self.cfg.temperature, **params}
        key = cache_key(self.client.model_id, "chat", messages, params)
        hit = self.cache.get(key)
        if hit is not None:
            self._add_usage(item, hit.get("usage") or {})
            return ChatResult(text=hit["text"], usage=hit.get("usage") or {}, cached=True)
        self.requests += 1
        result = await self.client.chat(messages, **params)
        if result.error is None:  # failures are not cached, so a rerun retries them
            text = self.task.redact(item, result.text) if self.task.private else result.text
            self.cache.put(key, {"text": text, "usage": result.usage})
            self._add_usage(item, result.usage)
        return result

    async def loglikelihood(self, context: str, continuations: list[str]) -> list[float] | None:
        key = cache_key(self.client.model_id, "loglik", [context, continuations])
        hit = self.cache.get(key)
        if hit is not None:
            return hit["loglik"]
        self.requests += 1
        lls = await self.client.loglikelihood(context, continuations)
        if lls is not None:
            self.cache.put(key, {"loglik": [float(x) for x in lls]})
        return lls


async def _run_item(task: Task, item: EvalItem, ctx: RunContext, sem: asyncio.Semaphore) -> dict:
    async with sem:
        start = time.perf_counter()
        try:
            out = await task.run_item(item, ctx)
        except Exception as exc:  # a scorer bug on one item must not lose the others
            out = {"score": 0.0, "correct": False, "pred": None, "error": f"{type(exc).__name__}: {exc}"}
    record = {"id": item.id, "group": item.group, "target": item.target, **item.meta, **out,
              "latency_s": round(time.perf_counter() - start, 4), "usage": ctx.usage.get(item.id)}
    if task.private:
        record.pop("response", None)  # GPQA: ids, letters and correctness only
    elif isinstance(record.get("response"), str):
        record["response"] = record["response"][:RESPONSE_KEEP_CHARS]
    return record


async def run_task(client: Client, task: Task, cfg: RunConfig, cache: ResponseCache) -> dict:
    items = task.load(cfg.task_options())
    result = await _score_items(client, task, cfg, cache, items, task.name)
    for control in cfg.image_controls:
        other = task.with_image_control(items, control)
        if other is not None:  # text tasks have no images to replace
            ctl = await _score_items(client, task, cfg, cache, other, f"{task.name} [{control} image]")
            result.setdefault("controls", {})[control] = ctl
    return result


async def _score_items(client: Client, task: Task, cfg: RunConfig, cache: ResponseCache, items: list[EvalItem],
                       label: str) -> dict:
    ctx = RunContext(client, cache, task, cfg)
    if cfg.mode == "loglik" and not ctx.client_supports_loglik:
        raise EvalError(f"--mode loglik needs a client with log-likelihoods; {client.model_id} has none "
                        "(chat endpoints are scored with --mode generate)")
    sem = asyncio.Semaphore(max(cfg.concurrency, int(getattr(client, "preferred_concurrency", 0) or 0)))
    start = time.perf_counter()
    records: list[dict] = []
    scored = _ScoringStats(client)
    bar = tqdm(total=len(items), desc=label, unit="item", dynamic_ncols=True)
    try:
        for fut in asyncio.as_completed([_run_item(task, it, ctx, sem) for it in items]):
            records.append(await fut)
            bar.update(1)
            bar.set_postfix(acc=f"{sum(r['score'] for r in records) / len(records):.3f}",
                            failed=sum(1 for r in records if r.get("error")), **scored.postfix(start))
    finally:
        bar.close()
    order = {it.id: i for i, it in enumerate(items)}
    records.sort(key=lambda r: order.get(r["id"], 0))
    wall = time.perf_counter() - start
    return {
        "metrics": task.aggregate(records),
        "n_items": len(records),
        "n_failed": sum(1 for r in records if r.get("error")),
        "requests": ctx.requests,
        "timing": {"wall_s": round(wall, 3), "items_per_s": round(len(records) / wall, 3) if wall else None},
        "usage": {k: sum((r.get("usage") or {}).get(k, 0) for r in records)
                  for k in ("prompt_tokens", "completion_tokens")},
        **scored.record(wall),
        "items": records,
    }


class _ScoringStats:
    """Tokens an in-process client scored and contexts it cut from the left, over one task (clients without
    `stats()`, e.g. endpoints, report nothing)."""

    def __init__(self, client: Client):
        self.stats = getattr(client, "stats", None)
        self.start = self.stats() if self.stats else None

    def delta(self) -> dict:
        now = self.stats()
        return {k: now[k] - self.start[k] for k in now}

    def postfix(self, t0: float) -> dict:
        if self.stats is None:
            return {}
        d, wall = self.delta(), time.perf_counter() - t0
        return {"tok_s": f"{d['tokens_scored'] / wall:,.0f}"} if d["tokens_scored"] and wall > 0 else {}

    def record(self, wall: float) -> dict:
        if self.stats is None:
            return {}
        d = self.delta()
        return {"scoring": {**d, "tokens_per_s": round(d["tokens_scored"] / wall, 1) if wall else None}}


def _config_record(cfg: RunConfig) -> dict:
    d = asdict(cfg)
    return {k: str(v) if isinstance(v, Path) else v for k, v in d.items()}


async def run_async(client: Client, cfg: RunConfig, tasks: list[Task] | None = None) -> dict:
    tasks = tasks if tasks is not None else get_tasks(cfg.tasks)
    out = Path(cfg.out_dir) if cfg.out_dir else None
    cache = ResponseCache(out / "cache.jsonl" if out else None)
    results = {"format": "omnimini-eval/1", "model": client.model_id, "config": _config_record(cfg),
               "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
               "host": platform.node(), "tasks": {}}
    for task in tasks:
        results["tasks"][task.name] = await run_task(client, task, cfg, cache)
        results["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
        if out:  # written after every task so a long run leaves usable partial results
            write_results(results, out / "results.json")
    results["cache"] = {"hits": cache.hits, "misses": cache.misses, "entries": len(cache)}
    if out:
        write_results(results, out / "results.json")
    return results


def run(client: Client, cfg: RunConfig, tasks: list[Task] | None = None) -> dict:
    async def main() -> dict:
        try:
            return await run_async(client, cfg, tasks)
        finally:
            closer = getattr(client, "aclose", None)
            if closer is not None:
                await closer()

    return asyncio.run(main())


def write_results(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1, ensure_ascii=False, default=str), encoding="utf-8")
    tmp.replace(path)  # atomic: a kill never leaves a half-written results.json


def headline(task_result: dict) -> tuple[float, list[float], int]:
    overall = task_result["metrics"]["overall"]
    return overall["mean"], overall["ci95"], overall["n"]


def format_summary(results: dict) -> str:
    rows = [("task", "score %", "95% CI", "n", "failed", "items/s")]
    for name, tr in results["tasks"].items():
        mean, (lo, hi), n = headline(tr)
        rows.append((name, f"{100 * mean:.1f}", f"[{100 * lo:.1f}, {100 * hi:.1f}]", str(n),
                     str(tr["n_failed"]), str(tr["timing"]["items_per_s"])))
        for control, ctl in tr.get("controls", {}).items():  # next to the real score, with the gap to it
            c_mean, (c_lo, c_hi), c_n = headline(ctl)
            rows.append((f"  {control} image (gap {100 * (mean - c_mean):+.1f})", f"{100 * c_mean:.1f}",
                         f"[{100 * c_lo:.1f}, {100 * c_hi:.1f}]", str(c_n), str(ctl["n_failed"]),
                         str(ctl["timing"]["items_per_s"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for name, tr in results["tasks"].items():
        sc = tr.get("scoring") or {}
        if sc.get("tokens_scored"):
            lines.append(f"{name}: {sc['tokens_scored']:,} tokens scored ({sc['tokens_per_s']:,.0f} tok/s)"
                         + (f"; {sc['truncated']} contexts cut from the left to fit the model's context"
                            if sc.get("truncated") else ""))
    return f"model: {results['model']}\n" + "\n".join(lines)
