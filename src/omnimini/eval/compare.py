"""Leaderboard across results.json files, with GPT-4o mini's published figures as a reference row."""

from __future__ import annotations

import json
from pathlib import Path

from omnimini.eval.errors import EvalDataError
from omnimini.eval.reference import GPT4O_MINI

COLUMNS = [("MMLU", ["mmlu"], "mmlu"), ("MMLU-Pro", ["mmlu_pro"], None),
           ("GPQA", ["gpqa_diamond", "gpqa_main"], "gpqa"), ("HLE", ["hle"], None),
           ("Scene QA", ["scene_qa"], None), ("Pointing", ["pointing"], None),
           ("Planning", ["planning"], None), ("Navigation", ["navigation"], None),
           ("EB-ALFRED", [], "eb_alfred"), ("EB-Habitat", [], "eb_habitat"), ("EB-Nav", [], "eb_navigation")]


def load_results(path: str | Path) -> dict:
    p = Path(path)
    if p.is_dir():
        p = p / "results.json"
    if not p.exists():
        raise EvalDataError(f"results file not found: {p}")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise EvalDataError(f"{p}: not valid JSON ({exc})") from None
    if not isinstance(data, dict) or "tasks" not in data:
        raise EvalDataError(f"{p}: not an omnimini eval results file (no 'tasks')")
    return data


def _row(name: str, tasks: dict) -> list[str | float | None]:
    cells: list[str | float | None] = [name]
    for _, names, _ in COLUMNS:
        hit = next((tasks[n] for n in names if n in tasks), None)
        cells.append(100 * hit["metrics"]["overall"]["mean"] if hit else None)
    return cells


def compare(results_paths: list[str | Path]) -> str:
    """Markdown leaderboard, sorted by MMLU (missing last); GPT-4o mini is always a row."""
    rows = []
    for path in results_paths:
        data = load_results(path)
        rows.append(_row(str(data.get("model", path)), data["tasks"]))
    ref = GPT4O_MINI["scores"]
    rows.append([GPT4O_MINI["name"]] + [ref.get(key) if key else None for _, _, key in COLUMNS])
    rows.sort(key=lambda r: -(r[1] if r[1] is not None else -1))
    header = ["Model"] + [c for c, _, _ in COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        lines.append("| " + " | ".join([str(r[0])] + [f"{v:.1f}" if v is not None else "—" for v in r[1:]]) + " |")
    lines.append("\nScores in %. EB-* are GPT-4o mini's published 3D embodied results (EmbodiedBench); "
                 "omnimini's Scene QA / Pointing / Planning / Navigation are its own 2D tasks.")
    return "\n".join(lines)
