"""The paired statistics of mlan.eval.stats against independent references: scipy's exact binomial test,
an item-level bootstrap written out plainly, and a simulation of the McNemar test's power."""
from __future__ import annotations

import math

import numpy as np
import pytest

from mlan.eval.stats import (
    compare_paired,
    mcnemar_exact_p,
    min_detectable_difference,
    paired_bootstrap_ci,
    paired_counts,
    wilson_ci,
)


def test_mcnemar_exact_p_hand_computed() -> None:
    # 1 vs 5 discordant pairs: P(X <= 1 | Binom(6, 1/2)) = (1 + 6) / 64; two-sided doubles it
    assert mcnemar_exact_p(1, 5) == pytest.approx(14 / 64)
    assert mcnemar_exact_p(5, 1) == pytest.approx(14 / 64)
    assert mcnemar_exact_p(3, 3) == 1.0  # the doubled tail passes 1 and is capped
    assert mcnemar_exact_p(0, 0) == 1.0
    assert mcnemar_exact_p(0, 10) == pytest.approx(2 / 1024)


@pytest.mark.parametrize(("a_only", "b_only"), [(1, 5), (0, 7), (12, 30), (40, 41), (100, 140), (3, 0)])
def test_mcnemar_exact_p_equals_scipy_binomtest(a_only: int, b_only: int) -> None:
    stats = pytest.importorskip("scipy.stats")
    ref = stats.binomtest(a_only, a_only + b_only, 0.5, alternative="two-sided").pvalue
    assert mcnemar_exact_p(a_only, b_only) == pytest.approx(ref, rel=1e-9)


def test_paired_counts_and_comparison() -> None:
    a = [True, True, False, False, True, False, True, True]
    b = [True, False, True, True, True, False, False, True]
    c = paired_counts(a, b)
    assert (c.n, c.both, c.a_only, c.b_only) == (8, 3, 2, 2)
    cmp = compare_paired(a, b)
    assert cmp.accuracy_a == 62.5 and cmp.accuracy_b == 62.5 and cmp.difference == 0.0
    assert cmp.ci95_a == wilson_ci(5, 8)
    assert cmp.mcnemar_p == 1.0
    with pytest.raises(ValueError):
        paired_counts([True], [True, False])


def test_paired_bootstrap_matches_an_item_level_bootstrap() -> None:
    """The multinomial shortcut gives the interval that resampling item indices gives."""
    rng = np.random.default_rng(7)
    n = 400
    a = rng.random(n) < 0.55
    b = np.where(rng.random(n) < 0.2, ~a, a)  # 20 % of items flip
    c = paired_counts(a.tolist(), b.tolist())
    lo, hi = paired_bootstrap_ci(c)
    d = b.astype(float) - a.astype(float)
    idx = np.random.default_rng(123).integers(0, n, size=(10_000, n))
    ref_lo, ref_hi = np.percentile(100 * d[idx].mean(axis=1), [2.5, 97.5])
    assert abs(lo - ref_lo) < 0.6 and abs(hi - ref_hi) < 0.6  # two Monte-Carlo draws of the same interval
    assert lo < c.difference < hi
    # the normal-approximation interval of a paired difference is close at this n
    se = 100 * d.std(ddof=1) / math.sqrt(n)
    assert abs((hi - lo) - 2 * 1.96 * se) < 1.0
    assert paired_bootstrap_ci(c) == (lo, hi)  # seeded: the same interval every time


def test_min_detectable_difference_against_a_simulated_mcnemar_test() -> None:
    """At the returned δ, the exact McNemar test at 5 % rejects in ≈ 80 % of simulated studies.

    Connor's formula is a normal approximation; the exact test is slightly conservative (≈ 77-79 %
    measured), so the bound is [0.74, 0.86]; at half the δ the power is far below 80 %.
    """
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(1)
    for n, psi in [(500, 0.2), (2000, 0.1), (100, 0.3)]:
        powers = []
        for delta in (min_detectable_difference(n, psi) / 100, min_detectable_difference(n, psi) / 200):
            draws = rng.multinomial(n, [(psi - delta) / 2, (psi + delta) / 2, 1 - psi], size=4000)
            m, k = draws[:, 0] + draws[:, 1], draws[:, :2].min(axis=1)
            p = np.minimum(1.0, 2 * stats.binom.cdf(k, m, 0.5))
            powers.append(float((p < 0.05).mean()))
        assert 0.74 < powers[0] < 0.86, (n, psi, powers)
        assert powers[1] < 0.45, (n, psi, powers)


def test_min_detectable_difference_shape() -> None:
    # more items or fewer disagreements → smaller detectable differences; √n scaling at small δ
    assert min_detectable_difference(2000, 0.2) < min_detectable_difference(500, 0.2)
    assert min_detectable_difference(1000, 0.1) < min_detectable_difference(1000, 0.3)
    ratio = min_detectable_difference(400, 0.2) / min_detectable_difference(1600, 0.2)
    assert 1.9 < ratio < 2.1
    assert min_detectable_difference(3, 0.01) == math.inf
    with pytest.raises(ValueError):
        min_detectable_difference(100, 0.0)


def test_group_ci_of_one_task_matches_the_wilson_interval_roughly() -> None:
    from mlan.eval.stats import group_ci

    lo, hi = group_ci([(120, 200)])
    w_lo, w_hi = wilson_ci(120, 200)
    assert abs(lo - w_lo) < 1.5 and abs(hi - w_hi) < 1.5


def test_group_ci_of_a_mean_shrinks_with_more_tasks_and_harmonic_mean_hits_zero() -> None:
    from mlan.eval.stats import group_ci, harmonic_of

    one = group_ci([(100, 200)])
    four = group_ci([(100, 200)] * 4)
    assert (four[1] - four[0]) < 0.6 * (one[1] - one[0])  # ≈ 1/√4 of the width
    assert harmonic_of(np.array([[50.0, 0.0], [50.0, 50.0]])).tolist() == [0.0, 50.0]
    assert group_ci([(0, 10), (5, 10)], harmonic_of) == (0.0, 0.0)


def test_paired_group_difference_of_one_task_equals_the_paired_bootstrap() -> None:
    from mlan.eval.stats import PairedCounts, paired_group_difference

    t = PairedCounts(n=300, both=150, a_only=20, b_only=35)
    diff, (lo, hi) = paired_group_difference([t])
    assert diff == pytest.approx(t.difference)
    ref_lo, ref_hi = paired_bootstrap_ci(t)
    assert abs(lo - ref_lo) < 0.7 and abs(hi - ref_hi) < 0.7
