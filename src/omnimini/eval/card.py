"""Model card in markdown, with the sections of GPT-4o mini's card."""

from __future__ import annotations

from omnimini.eval.reference import GPT4O_MINI, alscore, ratio_verdict

TEXT_BENCHMARKS = [("MMLU", ["mmlu"], "mmlu"), ("MMLU-Pro", ["mmlu_pro"], None),
                   ("GPQA", ["gpqa_diamond", "gpqa_main"], "gpqa"), ("HLE", ["hle"], None)]
EMBODIED = [("Scene QA", "scene_qa"), ("Pointing", "pointing"), ("Planning", "planning"),
            ("Navigation", "navigation")]


def merge_results(results: dict | list[dict]) -> dict:
    """Several results.json files as one {task: task_result} map (later files win)."""
    merged: dict = {}
    for r in results if isinstance(results, list) else [results]:
        for name, tr in r.get("tasks", {}).items():
            merged[name] = {**tr, "shots": r.get("config", {}).get("shots", 0)}
    return merged


def pct(mean: float) -> str:
    return f"{100 * mean:.1f}"


def score_cell(tr: dict) -> str:
    o = tr["metrics"]["overall"]
    lo, hi = o["ci95"]
    return f"{pct(o['mean'])} [{pct(lo)}, {pct(hi)}]"


def _count(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.0f}"


def overview_section(name: str, params: dict, overview: str | None) -> list[str]:
    total, active = float(params["total_params"]), float(params.get("active_params") or params["total_params"])
    tokens = float(params.get("tokens") or 0)
    ratio = tokens / total if total else 0.0
    lines = [f"# {name}", "", "## Overview", "",
             overview or f"{name}: an omnimini model (text + image in, text out), evaluated with the "
             "omnimini harness on the benchmarks GPT-4o mini is known by.", "",
             "## Model", "", "| | |", "|---|---|",
             f"| Type | {'MoE (mixture of experts)' if params.get('moe') else 'dense'} |",
             f"| Total parameters | {_count(total)} ({total:,.0f}) |",
             f"| Active parameters per token | {_count(active)} ({active:,.0f}) |",
             f"| Training tokens | {_count(tokens) if tokens else 'unknown'} |"]
    if tokens:
        lines += [f"| Token:param ratio | {ratio:,.0f}:1 — {ratio_verdict(ratio)} |",
                  f"| ALScore | {alscore(total / 1e9, tokens / 1e9):.4f} (sqrt(params_B × tokens_B) / 300; "
                  f"GPT-4o mini ≈ {alscore(8, 13000):.1f}) |"]
    return lines + [""]


def benchmark_section(tasks: dict) -> list[str]:
    lines = ["## Benchmarks", "", "| Benchmark | Score % [95% CI] | n | Shots | GPT-4o mini (published) |",
             "|---|---|---|---|---|"]
    for label, names, ref_key in TEXT_BENCHMARKS:
        name = next((n for n in names if n in tasks), None)
        ref = GPT4O_MINI["scores"].get(ref_key) if ref_key else None
        ref_cell = f"{ref:.1f}" if ref is not None else "—"
        if name is None:
            lines.append(f"| {label} | not run | | | {ref_cell} |")
            continue
        tr = tasks[name]
        label = f"{label} ({name.split('_', 1)[1]})" if name.startswith("gpqa_") else label
        lines.append(f"| {label} | {score_cell(tr)} | {tr['n_items']} | {tr.get('shots', 0)} | {ref_cell} |")
    return lines + [""]


def embodied_section(tasks: dict) -> list[str]:
    lines = ["## Embodied (2D scenes, evaluation seeds)", "", "| Task | Success % [95% CI] | n | Sub-scores |",
             "|---|---|---|---|"]
    for label, name in EMBODIED:
        if name not in tasks:
            lines.append(f"| {label} | not run | | |")
            continue
        tr = tasks[name]
        m = tr["metrics"]
        subs = [f"{g} {pct(s['mean'])}" for g, s in m["groups"].items()]
        subs += [f"{k.upper()} {pct(m[k]['mean'])}" for k in ("spl", "fraction_inside") if k in m]
        lines.append(f"| {label} | {score_cell(tr)} | {tr['n_items']} | {', '.join(subs)} |")
    ref = GPT4O_MINI["scores"]
    lines += ["", f"Reference (different, 3D benchmarks): GPT-4o mini EB-ALFRED {ref['eb_alfred']}, "
              f"EB-Habitat {ref['eb_habitat']}, EB-Navigation {ref['eb_navigation']}.", ""]
    return lines


TRAINING_FILE = "training.json"  # {"training_tokens": N, ...}: written beside a shipped checkpoint (all its stages)


def params_from_model(spec: str | None) -> dict:
    """Card parameters from the model itself: total and active parameters and MoE-ness from its config, training
    tokens from its metadata (training.json, else the trainer state of a training checkpoint: that stage's
    tokens; the default model: its published budget)."""
    import json
    from pathlib import Path

    from omnimini.config import param_counts
    from omnimini.weights.convert import detect, load_any
    from omnimini.weights.packaged import resolve

    model, _ = load_any(spec)
    counts = param_counts(model.config)
    out = {"total_params": counts["total_params"], "active_params": counts["active_params"],
           "moe": model.config.moe is not None}
    path = resolve(spec)
    if detect(path) == "default":
        from omnimini.weights.default import TEXT_MODEL_TRAINING_TOKENS

        out["tokens"] = TEXT_MODEL_TRAINING_TOKENS
    elif path is not None and Path(path).is_dir():
        from omnimini.train.state import STATE_FILE

        meta, state = Path(path) / TRAINING_FILE, Path(path) / STATE_FILE
        if meta.is_file():
            out["tokens"] = float(json.loads(meta.read_text()).get("training_tokens") or 0) or None
        elif state.is_file():
            import torch

            out["tokens"] = float(torch.load(state, weights_only=False, map_location="cpu").get("tokens_seen", 0))
    return {k: v for k, v in out.items() if v is not None}


def build_card(results: dict | list[dict], params: dict, name: str | None = None,
               overview: str | None = None) -> str:
    """Markdown model card; ``params``: {"total_params", "active_params", "tokens", "moe"}."""
    if "total_params" not in params:
        raise ValueError("params must include total_params (and ideally active_params, tokens, moe)")
    first = results[0] if isinstance(results, list) and results else results
    name = name or (first.get("model") if isinstance(first, dict) else None) or "omnimini model"
    tasks = merge_results(results)
    return "\n".join(overview_section(name, params, overview) + benchmark_section(tasks)
                     + embodied_section(tasks))
