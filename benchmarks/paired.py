"""Paired-difference statistics shared by the ablation benchmarks (several seeds, 95% t-intervals)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence

#: two-sided 95% quantiles of Student's t by degrees of freedom (10 stands for 10 and more).
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its two-sided 95% t-interval (NaN for a single value)."""
    n, mean = len(values), statistics.fmean(values)
    return mean, (T975[min(n - 1, 10)] * statistics.stdev(values) / math.sqrt(n)) if n > 1 else float("nan")


def summarise(runs: dict[int, dict[str, dict[str, float]]], arms: Sequence[str], metrics: Sequence[str],
              diffs: Sequence[tuple[str, str]], labels: Mapping[str, str] | None = None) -> tuple[str, dict]:
    """Markdown tables of ``runs[seed][arm][metric]``: mean ± std (%) per arm, then each paired difference
    ``x - y`` (same seed) with its 95% interval; and the same numbers as a JSON-ready dict."""
    seeds = sorted(runs)
    sd = (lambda v: statistics.stdev(v) if len(v) > 1 else 0.0)  # noqa: E731
    rule = "|---" * (len(metrics) + 1) + "|"
    lines = ["| arm | " + " | ".join(metrics) + " |", rule]
    summary: dict = {"arms": {}, "differences": {}}
    for arm in arms:
        values = {m: [runs[s][arm][m] for s in seeds] for m in metrics}
        summary["arms"][arm] = values
        name = f"{arm} {labels[arm]}" if labels else arm
        lines.append(f"| {name} | " + " | ".join(f"{100 * statistics.fmean(v):.2f} ± {100 * sd(v):.2f}"
                                               for v in values.values()) + " |")
    lines += ["", "| paired difference | " + " | ".join(f"Δ{m} [95% CI]" for m in metrics) + " |", rule]
    for x, y in diffs:
        cells = []
        for m in metrics:
            mean, half = interval([runs[s][x][m] - runs[s][y][m] for s in seeds])
            cells.append(f"{100 * mean:+.2f} [{100 * (mean - half):+.2f}, {100 * (mean + half):+.2f}]")
            summary["differences"][f"{x} - {y}/{m}"] = {"mean": mean, "half_width": half}
        lines.append(f"| {x} - {y} | " + " | ".join(cells) + " |")
    return "\n".join(lines), summary
