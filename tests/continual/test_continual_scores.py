"""Intervals of the continual scores' mean forgetting and backward transfer (issue #20): a paired bootstrap over
items, checked against a brute-force resampling of a small synthetic matrix of per-item records."""
from __future__ import annotations

import json

import numpy as np
import pytest

from mlan.continual.scores import forgetting_intervals, write_outputs

TASK_SETS = [["lang"], ["v1"], ["v2a", "v2b"], ["v3"]]
N_ITEMS = {"lang": 50, "v1": 200, "v2a": 160, "v2b": 120, "v3": 100}  # fine steps: 100 / n points


def _entry(group: str, correct: dict[str, bool]) -> dict:
    """An eval file's task entry with per-item records keyed by id (listed in the given order)."""
    values = list(correct.values())
    return {"accuracy": 100 * sum(values) / len(values), "n": len(values), "group": group, "kind": "choice",
            "records": [{"id": i, "correct": c, "loglikelihoods": [0.0, 0.0]} for i, c in correct.items()]}


def synthetic_evals(seed: int = 3, same: bool = False) -> tuple[dict[int, dict], dict[tuple[str, int], dict]]:
    """evals[k] after each of 4 tasks, every set scored after its task and later; a later evaluation lists the
    items in another order (pairing is by id) and flips some of them (forgetting and recovery). With `same`
    every evaluation of a set repeats the first one: nothing is forgotten."""
    rng = np.random.default_rng(seed)
    truth: dict[tuple[str, int], dict] = {}
    evals: dict[int, dict] = {}
    for k in range(1, 5):
        tasks = {}
        for t, names in enumerate(TASK_SETS[:k], 1):
            for name in names:
                ids = [f"{name}-{i}" for i in range(N_ITEMS[name])]
                if k == t or same:
                    first = truth.get((name, t)) or {i: bool(rng.random() < 0.8) for i in ids}
                    correct = dict(first)
                else:  # from the previous evaluation: some items forgotten, many recovered (ω_t not monotone)
                    correct = {i: (c and rng.random() > 0.1) or (not c and rng.random() < 0.3)
                               for i, c in truth[(name, k - 1)].items()}
                truth[(name, k)] = correct
                order = rng.permutation(ids)
                tasks[name] = _entry("language" if t == 1 else "vision", {i: correct[i] for i in order})
        evals[k] = {"tasks": tasks}
    return evals, truth


def _harmonic(acc: np.ndarray) -> np.ndarray:
    """Harmonic mean over the last axis (0 where any value is 0), written out independently of mlan's."""
    with np.errstate(divide="ignore"):
        return np.where((acc == 0).any(axis=-1), 0.0, acc.shape[-1] / (1 / acc).sum(axis=-1))


def brute_force(truth: dict[tuple[str, int], dict], resamples: int, seed: int) -> tuple[dict, dict]:
    """Draw n indices per set per replicate, score every evaluation of the set on those same items, recompute
    ω, mean forgetting and BWT per replicate; percentile intervals."""
    rng = np.random.default_rng(seed)
    omega: dict[tuple[int, int], np.ndarray] = {}
    for t, names in enumerate(TASK_SETS[1:], 2):
        per_set = []
        for name in names:
            ids = sorted(truth[(name, t)])
            idx = rng.integers(0, len(ids), size=(resamples, len(ids)))
            matrix = np.array([[truth[(name, k)][i] for i in ids] for k in range(t, 5)], dtype=float)
            per_set.append(100 * matrix[:, idx].mean(axis=-1).T)  # (resamples, evaluations)
        w = _harmonic(np.stack(per_set, axis=-1))
        for j, k in enumerate(range(t, 5)):
            omega[(t, k)] = w[:, j]
    forget, transfer = {}, {}
    for k in (3, 4):
        earlier = range(2, k)
        f = np.mean([np.max([omega[(t, m)] for m in range(t, k)], axis=0) - omega[(t, k)] for t in earlier], axis=0)
        b = np.mean([omega[(t, k)] - omega[(t, t)] for t in earlier], axis=0)
        forget[k], transfer[k] = np.percentile(f, [2.5, 97.5]), np.percentile(b, [2.5, 97.5])
    return forget, transfer


def test_paired_bootstrap_matches_brute_force_resampling_of_items() -> None:
    evals, truth = synthetic_evals()
    got = forgetting_intervals(evals, TASK_SETS, None)
    forget, transfer = brute_force(truth, resamples=6000, seed=11)
    assert sorted(got["mean_forgetting_ci95"]) == sorted(got["backward_transfer_ci95"]) == [3, 4]
    for k in (3, 4):
        # two independent Monte Carlo runs: the ends agree to within a step of 100 / n (measured ≤ 0.5 over 3 seeds)
        assert got["mean_forgetting_ci95"][k] == pytest.approx(list(forget[k]), abs=1.0)
        assert got["backward_transfer_ci95"][k] == pytest.approx(list(transfer[k]), abs=1.0)
        lo, hi = got["backward_transfer_ci95"][k]
        assert hi - lo > 2.0  # a real interval, not a point
    # an unpaired bootstrap (evaluations resampled independently) would be far wider: pairing matters here
    rng = np.random.default_rng(5)
    after2 = np.array([truth[("v1", 2)][i] for i in sorted(truth[("v1", 2)])], dtype=float)
    after3 = np.array([truth[("v1", 3)][i] for i in sorted(truth[("v1", 3)])], dtype=float)
    idx_a, idx_b = (rng.integers(0, len(after2), size=(6000, len(after2))) for _ in range(2))
    unpaired = np.percentile(100 * (after3[idx_b].mean(-1) - after2[idx_a].mean(-1)), [2.5, 97.5])
    lo, hi = got["backward_transfer_ci95"][3]  # BWT(3) = ω_2(3) − ω_2(2), v1 alone
    assert hi - lo < 0.8 * (unpaired[1] - unpaired[0])


def test_no_forgetting_gives_zero_width_intervals_at_zero(tmp_path) -> None:
    evals, _ = synthetic_evals(same=True)
    scores = write_outputs(tmp_path, "t", "naive", "none", ["l", "a", "b", "c"], TASK_SETS, evals, None, {})
    for key in ("mean_forgetting", "backward_transfer"):
        for k in (3, 4):
            assert scores[key][k] == 0.0
            assert scores[f"{key}_ci95"][k] == [0.0, 0.0]
    saved = json.loads((tmp_path / "forgetting.json").read_text())
    assert saved["mean_forgetting_ci95"] == {"3": [0.0, 0.0], "4": [0.0, 0.0]}
    assert saved["backward_transfer_ci95"] == {"3": [0.0, 0.0], "4": [0.0, 0.0]}
    last_row = next(line for line in (tmp_path / "report.md").read_text().splitlines() if line.startswith("| 4 |"))
    assert last_row.endswith("| 0.0 ± 0.0 | 0.0 ± 0.0 |")


def test_report_shows_the_interval_and_leaves_it_out_without_records(tmp_path) -> None:
    evals, _ = synthetic_evals()
    scores = write_outputs(tmp_path, "t", "naive", "none", ["l", "a", "b", "c"], TASK_SETS, evals, None, {})
    lo, hi = scores["mean_forgetting_ci95"][4]
    row = next(line for line in (tmp_path / "report.md").read_text().splitlines() if line.startswith("| 4 |"))
    assert f"| {scores['mean_forgetting'][4]:.1f} ± {(hi - lo) / 2:.1f} |" in row
    assert lo <= scores["mean_forgetting"][4] <= hi
    # after task 4 without per-item records for v2a: no interval for k = 4 (it needs ω_3(4)), still one for k = 3
    del evals[4]["tasks"]["v2a"]["records"]
    partial = forgetting_intervals(evals, TASK_SETS, None)
    assert list(partial["mean_forgetting_ci95"]) == list(partial["backward_transfer_ci95"]) == [3]
