"""Statistics every score carries: n, a Wilson 95 % interval, the chance and majority levels.

A number without its n and interval is not a result (design.md "A score"); these are the one place the
interval is computed, so every table and plot agrees with the results file.
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

Z95 = 1.959963984540054  # the two-sided 95 % normal quantile


def wilson_ci(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion, in percent; it stays inside [0, 100] even at 0/n and n/n."""
    if n <= 0:
        raise ValueError("a proportion needs n > 0")
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (100 * max(0.0, centre - half), 100 * min(1.0, centre + half))


def chance_level(option_counts: Sequence[int]) -> float:
    """Expected accuracy (%) of a uniform random guess: the mean over items of 1 / (number of options)."""
    if not option_counts:
        raise ValueError("chance needs at least one item")
    return 100 * sum(1 / k for k in option_counts) / len(option_counts)


def majority_rate(golds: Sequence[str]) -> float:
    """Accuracy (%) of always answering the most frequent gold answer (e.g. BoolQ's "true")."""
    if not golds:
        raise ValueError("majority needs at least one item")
    return 100 * Counter(golds).most_common(1)[0][1] / len(golds)
