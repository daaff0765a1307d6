"""Paired-difference statistics shared by the ablation benchmarks (several seeds, 95% t-intervals)."""

from __future__ import annotations

import math
import statistics

#: two-sided 95% quantiles of Student's t by degrees of freedom (10 stands for 10 and more).
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its two-sided 95% t-interval (NaN for a single value)."""
    n, mean = len(values), statistics.fmean(values)
    return mean, (T975[min(n - 1, 10)] * statistics.stdev(values) / math.sqrt(n)) if n > 1 else float("nan")
