"""Confidence intervals and aggregation of per-item outcomes."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable

Z95 = 1.959963984540054


def wilson_ci(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (well-behaved near 0 and 1, unlike Wald)."""
    if n <= 0:
        return (0.0, 0.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def normal_ci(values: list[float], z: float = Z95) -> tuple[float, float]:
    """Normal-approximation interval for the mean of bounded scores (SPL, pointing fractions)."""
    n = len(values)
    if n == 0:
        return (0.0, 0.0)
    mean = sum(values) / n
    if n == 1:
        return (mean, mean)
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    half = z * math.sqrt(var / n)
    return (mean - half, mean + half)


def summarize(values: list[float]) -> dict:
    """Mean, n and 95% CI; binary scores use Wilson, continuous ones the normal approximation."""
    n = len(values)
    if n == 0:
        return {"n": 0, "mean": 0.0, "ci95": [0.0, 0.0]}
    mean = sum(values) / n
    binary = all(v in (0, 1) for v in values)
    lo, hi = wilson_ci(sum(values), n) if binary else normal_ci(values)
    return {"n": n, "mean": mean, "ci95": [lo, hi]}


def aggregate(outcomes: Iterable[dict], key: str = "score", group_key: str = "group") -> dict:
    """Overall (micro-average over items, as lm-eval's weighted MMLU), per group, and macro average."""
    groups: dict[str, list[float]] = defaultdict(list)
    everything: list[float] = []
    for o in outcomes:
        v = float(o.get(key) or 0.0)  # failed items count as wrong, never silently dropped
        everything.append(v)
        groups[str(o.get(group_key) or "all")].append(v)
    per_group = {g: summarize(vs) for g, vs in sorted(groups.items())}
    macro = sum(s["mean"] for s in per_group.values()) / len(per_group) if per_group else 0.0
    return {"overall": summarize(everything), "groups": per_group, "macro": macro}
