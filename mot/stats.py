"""The standard error of a loss measured over clusters (an evaluation's micro-batches), alone or as a paired
difference between two runs evaluated on the same held-out batches."""

from __future__ import annotations

import math
from collections.abc import Sequence


def ratio_standard_error(sums: Sequence[float], counts: Sequence[float]) -> float:
    """Standard error of sum(sums) / sum(counts) as an estimate of the mean over the population the clusters
    were drawn from (tokens within a cluster are not independent): sqrt(B / (B - 1) * sum_b (s_b - mean *
    c_b)^2) / sum_b c_b, the delta method for a ratio. NaN below 2 clusters.

    For two runs on the same clusters (the same tokens), pass the differences of their sums: the standard
    error of the difference of their losses, which is far smaller than either's where the runs err alike."""
    sums, counts = [float(s) for s in sums], [float(c) for c in counts]
    total = sum(counts)
    if len(sums) < 2 or total == 0:
        return math.nan
    mean = sum(sums) / total
    spread = sum((s - mean * c) ** 2 for s, c in zip(sums, counts, strict=True))
    return math.sqrt(len(sums) / (len(sums) - 1) * spread) / total
