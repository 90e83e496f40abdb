"""Statistics every score carries: n, a Wilson 95 % interval, the chance and majority levels; and the paired
comparison of two runs on the same items (bootstrap interval of the difference, exact McNemar p, power).

A number without its n and interval is not a result (design.md "A score"); these are the one place the
interval is computed, so every table and plot agrees with the results file.
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mlan.errors import UserError

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


# ---------------------------------------------------------------- paired comparison of two runs on the same items
BOOTSTRAP_RESAMPLES = 10_000  # resamples of the paired bootstrap; the interval's ends move < 0.2 points between seeds
BOOTSTRAP_SEED = 0
Z80 = 0.8416212335729143  # the one-sided 80 % normal quantile (power 0.8)


@dataclass(frozen=True)
class PairedCounts:
    """The 2 × 2 table of two runs scored on the same n items: `a_only` right in A only, `b_only` in B only."""

    n: int
    both: int
    a_only: int
    b_only: int

    @property
    def discordant(self) -> int:
        return self.a_only + self.b_only

    @property
    def difference(self) -> float:
        """Accuracy of B minus accuracy of A, in percentage points."""
        return 100 * (self.b_only - self.a_only) / self.n


def paired_counts(correct_a: Sequence[bool], correct_b: Sequence[bool]) -> PairedCounts:
    """Count the 2 × 2 table of per-item correctness; the two sequences are the same items in the same order."""
    if len(correct_a) != len(correct_b):
        raise ValueError(f"paired runs need the same items: {len(correct_a)} vs {len(correct_b)}")
    if not correct_a:
        raise ValueError("a paired comparison needs n > 0")
    a_only = sum(1 for x, y in zip(correct_a, correct_b) if x and not y)
    b_only = sum(1 for x, y in zip(correct_a, correct_b) if y and not x)
    both = sum(1 for x, y in zip(correct_a, correct_b) if x and y)
    return PairedCounts(len(correct_a), both, a_only, b_only)


def paired_bootstrap_ci(counts: PairedCounts, resamples: int = BOOTSTRAP_RESAMPLES,
                        seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """Percentile 95 % interval (points) of accuracy(B) − accuracy(A) under resampling items with replacement.

    Each item contributes −1, 0 or +1 to the difference, so resampling n items is a multinomial draw of the
    (A only, B only, same) counts: exactly the item bootstrap, without materialising n × resamples indices.
    """
    n = counts.n
    probs = [counts.a_only / n, counts.b_only / n, 1 - counts.discordant / n]
    draws = np.random.default_rng(seed).multinomial(n, probs, size=resamples)
    diffs = 100 * (draws[:, 1] - draws[:, 0]) / n
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return float(lo), float(hi)


def mcnemar_exact_p(a_only: int, b_only: int) -> float:
    """Exact McNemar p: two-sided binomial test of the discordant pairs against 1/2 (1.0 when none differ).

    With p = 1/2 the binomial is symmetric, so the two-sided p is twice the smaller tail, capped at 1
    (the same value as scipy.stats.binomtest(a_only, a_only + b_only).pvalue).
    """
    m = a_only + b_only
    if m == 0:
        return 1.0
    k = min(a_only, b_only)
    tail = sum(math.comb(m, i) for i in range(k + 1)) / 2 ** m
    return min(1.0, 2 * tail)


def min_detectable_difference(n: int, discordance: float, alpha_z: float = Z95, power_z: float = Z80) -> float:
    """Smallest paired difference (points) a McNemar test at 5 % two-sided finds with 80 % power on n items.

    Connor's (1987) normal approximation for a discordance rate ψ (share of items where the runs disagree)
    and difference δ = p(B only) − p(A only): n δ² = (z_{α/2} √ψ + z_β √(ψ − δ²))²; solved for δ by
    bisection on (0, ψ]. Returns inf when even δ = ψ (every discordant pair one way) is not detectable.
    """
    if n <= 0:
        raise ValueError("power needs n > 0")
    if not 0 < discordance <= 1:
        raise ValueError(f"the discordance rate must be in (0, 1], got {discordance}")
    psi = discordance
    gap = lambda d: math.sqrt(n) * d - (alpha_z * math.sqrt(psi) + power_z * math.sqrt(max(psi - d * d, 0.0)))
    if gap(psi) < 0:
        return math.inf
    lo, hi = 0.0, psi
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if gap(mid) < 0 else (lo, mid)
    return 100 * hi


@dataclass(frozen=True)
class PairedComparison:
    """Two runs on the same items: both accuracies with Wilson intervals, B − A with its paired interval and p."""

    n: int
    accuracy_a: float
    ci95_a: tuple[float, float]
    accuracy_b: float
    ci95_b: tuple[float, float]
    difference: float  # points, B − A
    difference_ci95: tuple[float, float]
    mcnemar_p: float
    a_only: int
    b_only: int

    def as_dict(self) -> dict:
        return {"n": self.n, "a": {"accuracy": self.accuracy_a, "ci95": list(self.ci95_a)},
                "b": {"accuracy": self.accuracy_b, "ci95": list(self.ci95_b)},
                "difference": self.difference, "difference_ci95": list(self.difference_ci95),
                "mcnemar_p": self.mcnemar_p, "a_only": self.a_only, "b_only": self.b_only,
                "bootstrap": {"resamples": BOOTSTRAP_RESAMPLES, "seed": BOOTSTRAP_SEED}}


def compare_paired(correct_a: Sequence[bool], correct_b: Sequence[bool]) -> PairedComparison:
    """Everything a table needs to compare run B with run A on the same items (same order)."""
    c = paired_counts(correct_a, correct_b)
    right_a, right_b = c.both + c.a_only, c.both + c.b_only
    return PairedComparison(c.n, 100 * right_a / c.n, wilson_ci(right_a, c.n), 100 * right_b / c.n,
                            wilson_ci(right_b, c.n), c.difference, paired_bootstrap_ci(c),
                            mcnemar_exact_p(c.a_only, c.b_only), c.a_only, c.b_only)


# ---------------------------------------------------------------- two results on the same items, task by task
class ItemSetsDiffer(UserError):
    """Two runs of a task were scored on different items: a paired comparison is impossible."""


def _correct_by_id(task: str, records: Sequence[dict], side: str) -> dict[str, bool]:
    """{item id: correct}; an id is the record's own `id`, else its 0-based position (the score contract)."""
    out: dict[str, bool] = {}
    for i, rec in enumerate(records):
        item = str(rec.get("id", i))
        if item in out:
            raise ItemSetsDiffer(f"task {task}: item id {item!r} appears twice in {side}")
        out[item] = bool(rec["correct"])
    return out


def aligned_correct(task: str, records_a: Sequence[dict], records_b: Sequence[dict]) -> tuple[list[bool], list[bool]]:
    """Per-item correctness of A and B on the same ids, in A's order; ItemSetsDiffer names how many ids differ."""
    a = _correct_by_id(task, records_a, "A")
    b = _correct_by_id(task, records_b, "B")
    if a.keys() != b.keys():
        only_a, only_b = len(a.keys() - b.keys()), len(b.keys() - a.keys())
        raise ItemSetsDiffer(f"task {task}: the item sets differ ({only_a} id(s) only in A, {only_b} only in B, "
                             f"{len(a.keys() & b.keys())} shared); score both runs on the same items (--items)")
    return list(a.values()), [b[k] for k in a]


def compare_records(a_tasks: dict[str, dict], b_tasks: dict[str, dict]) -> dict:
    """Paired comparison of B with A per shared task and pooled per group.

    Each argument maps task name → {"group": …, "records": [per-item dicts with "correct" (and "id")]}
    (a results dict's "tasks" from `evaluate(..., keep_records=True)`, or a results file with its items file).
    Returns {"tasks": {name: PairedComparison.as_dict() + group}, "groups": {group: … + tasks},
    "only_a": [...], "only_b": [...]}; the pooled line pairs every item of the group's shared tasks.
    """
    shared = [name for name in a_tasks if name in b_tasks]
    tasks: dict[str, dict] = {}
    pooled: dict[str, tuple[list[bool], list[bool], list[str]]] = {}
    for name in shared:
        ca, cb = aligned_correct(name, a_tasks[name]["records"], b_tasks[name]["records"])
        if not ca:
            raise ItemSetsDiffer(f"task {name}: no items (n = 0)")
        group = a_tasks[name].get("group") or b_tasks[name].get("group") or "language"
        tasks[name] = {"group": group, **compare_paired(ca, cb).as_dict()}
        pa, pb, names = pooled.setdefault(group, ([], [], []))
        pa.extend(ca)
        pb.extend(cb)
        names.append(name)
    groups = {g: {"tasks": names, **compare_paired(pa, pb).as_dict()} for g, (pa, pb, names) in pooled.items()}
    return {"tasks": tasks, "groups": groups, "only_a": [n for n in a_tasks if n not in b_tasks],
            "only_b": [n for n in b_tasks if n not in a_tasks]}


def half_width(ci95: Sequence[float]) -> float:
    """Half the width of an interval: the '±' of a table cell (a Wilson interval is asymmetric near 0 and 100 %,
    so tables that print ± also keep the ends, e.g. in their CSV)."""
    return (ci95[1] - ci95[0]) / 2


def format_score(accuracy: float, ci95: Sequence[float]) -> str:
    """'54.1 [52.1, 56.1]': a score with its 95 % interval's ends."""
    return f"{accuracy:.1f} [{ci95[0]:.1f}, {ci95[1]:.1f}]"


def score_with_interval(task_entry: dict) -> tuple[float, tuple[float, float], int]:
    """(accuracy %, Wilson ci95, n) of a results-file task entry; the interval is computed when the entry
    predates the score contract (a count of correct items is recovered from accuracy × n)."""
    n, acc = int(task_entry["n"]), float(task_entry["accuracy"])
    ci = task_entry.get("ci95")
    if ci is None:
        ci = wilson_ci(round(acc * n / 100), n) if n > 0 else (0.0, 100.0)
    return acc, (float(ci[0]), float(ci[1])), n


# ---------------------------------------------------------------- intervals of table cells built from several tasks
def task_counts(entry: dict) -> tuple[int, int]:
    """(correct, n) of a task entry: from its records when present, else accuracy × n (exact for a percentage
    that came from a count)."""
    records = entry.get("records")
    if records:
        return sum(bool(r["correct"]) for r in records), len(records)
    n = int(entry["n"])
    return round(float(entry["accuracy"]) * n / 100), n


def task_chance(entry: dict) -> float | None:
    """The entry's chance level (%): the contract's `chance`, else from its records' option counts (choice
    tasks of today's harness), else None."""
    if entry.get("chance") is not None:
        return float(entry["chance"])
    if entry.get("kind") == "generate":
        return 0.0
    records = entry.get("records") or []
    options = [len(r.get("loglik") or r.get("loglikelihoods") or []) for r in records]
    return chance_level(options) if options and all(options) else None


def mean_of(accuracies: np.ndarray) -> np.ndarray:
    """Mean over tasks (last axis): a group average as results files report it."""
    return accuracies.mean(axis=-1)


def harmonic_of(accuracies: np.ndarray) -> np.ndarray:
    """Harmonic mean over tasks (last axis), 0 when a task is at 0 (the limit)."""
    with np.errstate(divide="ignore"):
        inv = np.where(accuracies > 0, 1 / np.maximum(accuracies, 1e-300), np.inf)
    return np.where(np.isinf(inv).any(axis=-1), 0.0, accuracies.shape[-1] / inv.sum(axis=-1))


def group_ci(counts: Sequence[tuple[int, int]], statistic=mean_of, resamples: int = BOOTSTRAP_RESAMPLES,
             seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """Bootstrap 95 % interval (%) of a statistic of several tasks' accuracies (mean, harmonic mean).

    Resampling a task's n items with replacement draws its correct count from Binomial(n, correct / n); tasks
    are resampled independently (they hold different items)."""
    rng = np.random.default_rng(seed)
    draws = np.stack([100 * rng.binomial(n, c / n, size=resamples) / n for c, n in counts], axis=-1)
    lo, hi = np.percentile(statistic(draws), [2.5, 97.5])
    return float(lo), float(hi)


def paired_group_difference(tables: Sequence[PairedCounts], statistic=mean_of,
                            resamples: int = BOOTSTRAP_RESAMPLES,
                            seed: int = BOOTSTRAP_SEED) -> tuple[float, tuple[float, float]]:
    """statistic(B) − statistic(A) (points) over several tasks, with its paired bootstrap 95 % interval.

    Each task's items are resampled jointly for both runs (a multinomial draw of its 2 × 2 table), so the
    interval is paired item by item as in `paired_bootstrap_ci`."""
    rng = np.random.default_rng(seed)
    acc_a, acc_b = [], []
    for t in tables:
        neither = t.n - t.both - t.discordant
        d = rng.multinomial(t.n, [t.both / t.n, t.a_only / t.n, t.b_only / t.n, neither / t.n], size=resamples)
        acc_a.append(100 * (d[:, 0] + d[:, 1]) / t.n)
        acc_b.append(100 * (d[:, 0] + d[:, 2]) / t.n)
    point_a = np.array([100 * (t.both + t.a_only) / t.n for t in tables])
    point_b = np.array([100 * (t.both + t.b_only) / t.n for t in tables])
    diffs = statistic(np.stack(acc_b, axis=-1)) - statistic(np.stack(acc_a, axis=-1))
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return float(statistic(point_b) - statistic(point_a)), (float(lo), float(hi))


def cell(value: float | None, ci95: Sequence[float] | None, digits: int = 1) -> str:
    """A table cell: '54.1 ± 2.0' (± half the 95 % interval's width), '–' for no value."""
    if value is None:
        return "–"
    if ci95 is None:
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} ± {half_width(ci95):.{digits}f}"


def difference_cell(diff: float | None, ci95: Sequence[float] | None, p: float | None = None) -> str:
    """'+3.1 [+0.4, +5.8]' (paired 95 % interval), with ', p 0.021' when an exact McNemar p is given."""
    if diff is None:
        return "–"
    if ci95 is None:
        return f"{diff:+.1f} (unpaired)"
    text = f"{diff:+.1f} [{ci95[0]:+.1f}, {ci95[1]:+.1f}]"
    return text + (f", p {p:.3g}" if p is not None else "")


def score_stats(results: dict) -> dict:
    """What a table row needs beside the accuracies: per task n, correct, Wilson ci95 and chance ("stats"), and
    the bootstrap 95 % interval of each group's average (`<group>_avg_ci95`)."""
    stats, by_group = {}, {}
    for name, entry in results["tasks"].items():
        if not entry.get("n"):
            continue  # n = 0 (an error in the score contract; today's harness reports it as 0 %): no interval
        correct, n = task_counts(entry)
        stats[name] = {"n": n, "correct": correct, "ci95": list(entry.get("ci95") or wilson_ci(correct, n)),
                       "chance": task_chance(entry)}
        by_group.setdefault(entry["group"], []).append((correct, n))
    out: dict = {"stats": stats}
    for group, counts in by_group.items():
        out[f"{group}_avg_ci95"] = list(group_ci(counts))
        out[f"{group}_n"] = sum(n for _, n in counts)
        chances = [stats[t]["chance"] for t, e in results["tasks"].items() if e["group"] == group and t in stats]
        out[f"{group}_chance"] = sum(chances) / len(chances) if None not in chances else None
    return out
