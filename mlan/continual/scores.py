"""The forgetting matrix and the paper's scores, from the per-task eval files.

ω_t(k): harmonic mean (%) of task t's eval-set accuracies after training task k (`zero_floor` replaces a 0
accuracy inside the mean, as the paper's tables suggest 0.1; None keeps the exact limit 0).
NL Δ(k) = ω_1(1) − ω_1(k) (Δ > 0: forgetting). VL Avg(k) = harmonic mean over every VL eval set of tasks 2…k.
Δ_t(k) = ω_t(t) − ω_t(k) for VL t < k; mean forgetting(k) = mean over VL t < k of max_{t≤l<k} ω_t(l) − ω_t(k)
(Chaudhry et al.); backward transfer(k) = mean over VL t < k of ω_t(k) − ω_t(t) (Lopez-Paz & Ranzato).
Intervals (95 %): Wilson per eval set; ω and VL Avg by bootstrap over items; NL Δ paired item by item
(the same language items scored after task 1 and after task k); mean forgetting and BWT by a paired bootstrap
(each eval set's items resampled once per replicate, the same resample for every after-task evaluation of
that set); the bootstrap ones only when the eval files carry per-item records.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from mlan.atomic_write import atomic_open, write_text_atomic
from mlan.eval.forgetting import harmonic_mean
from mlan.eval.stats import (
    BOOTSTRAP_RESAMPLES,
    BOOTSTRAP_SEED,
    aligned_correct,
    cell,
    difference_cell,
    group_ci,
    harmonic_of,
    paired_counts,
    paired_group_difference,
    task_chance,
    task_counts,
    wilson_ci,
)

COLUMNS = ("after_task", "task", "eval_set", "accuracy", "omega", "n", "ci95_lo", "ci95_hi", "chance")


def hmean(values: list[float], zero_floor: float | None) -> float:
    """The paper's ω: harmonic mean of accuracies in %, with 0 floored to `zero_floor` when given."""
    return harmonic_mean([max(v, zero_floor) if zero_floor else v for v in values])


def matrix_rows(evals: dict[int, dict], task_sets: list[list[str]], zero_floor: float | None) -> list[dict[str, Any]]:
    """One row per (after_task k, task t ≤ k, eval set); tasks and after_task are 1-based."""
    rows = []
    for k in sorted(evals):
        results = evals[k]["tasks"]
        for t, names in enumerate(task_sets[:k], 1):
            accs = [float(results[n]["accuracy"]) for n in names]
            w = hmean(accs, zero_floor)
            for n, a in zip(names, accs):
                row = {"after_task": k, "task": t, "eval_set": n, "accuracy": a, "omega": w, "n": None,
                       "ci95_lo": None, "ci95_hi": None, "chance": task_chance(results[n])}
                if results[n].get("n"):
                    correct, count = task_counts(results[n])
                    lo, hi = results[n].get("ci95") or wilson_ci(correct, count)
                    row.update(n=count, correct=correct, ci95_lo=lo, ci95_hi=hi)
                rows.append(row)
    return rows


def _omega_statistic(zero_floor: float | None):
    """ω over the last axis, with the zero floor applied as `hmean` applies it."""
    return lambda accs: harmonic_of(np.maximum(accs, zero_floor) if zero_floor else accs)


def intervals(rows: list[dict[str, Any]], evals: dict[int, dict], task_sets: list[list[str]],
              zero_floor: float | None) -> dict[str, Any]:
    """95 % intervals: ω_t(k) and VL Avg(k) by bootstrap over items; NL Δ(k) paired with after-task-1's
    per-item records (absent where an eval file has no records). Keys are as in `forgetting_scores`."""
    stat = _omega_statistic(zero_floor)
    omega_ci: dict[int, dict[int, list[float]]] = {}
    vl_ci: dict[int, list[float]] = {}
    for k in sorted({r["after_task"] for r in rows}):
        mine = [r for r in rows if r["after_task"] == k]
        if any(r["n"] is None for r in mine):
            continue
        for t in sorted({r["task"] for r in mine}):
            counts = [(r["correct"], r["n"]) for r in mine if r["task"] == t]
            omega_ci.setdefault(k, {})[t] = list(group_ci(counts, stat))
        vl = [(r["correct"], r["n"]) for r in mine if r["task"] > 1]
        if vl:
            vl_ci[k] = list(group_ci(vl, stat))
    nl_ci: dict[int, list[float]] = {}
    first = evals.get(1, {}).get("tasks", {})
    lang = task_sets[0] if task_sets else []
    if lang and all(first.get(n, {}).get("records") for n in lang):
        for k, results in sorted(evals.items()):
            later = results["tasks"]
            if k == 1 or not all(later.get(n, {}).get("records") for n in lang):
                continue
            tables = [paired_counts(*aligned_correct(n, first[n]["records"], later[n]["records"])) for n in lang]
            _, (lo, hi) = paired_group_difference(tables, stat)  # ω1(k) − ω1(1); NL Δ is its negative
            nl_ci[k] = [-hi, -lo]
    return {"omega_ci95": omega_ci, "vl_avg_ci95": vl_ci, "nl_delta_ci95": nl_ci,
            **forgetting_intervals(evals, task_sets, zero_floor)}


def _paired_omega_draws(evals: dict[int, dict], t: int, names: list[str], afters: list[int], rng: np.random.Generator,
                        statistic, resamples: int) -> np.ndarray:
    """ω_t(l) for every l in `afters` under `resamples` item resamples, shape (resamples, len(afters)).

    Each eval set's items are drawn once per replicate and that draw scores every after-task evaluation of the
    set (items aligned by id with after task t). Resampling n items with replacement is a multinomial draw of
    the items' correctness patterns across the evaluations (as `paired_group_difference` draws its 2 × 2 table),
    so n × resamples indices are never held."""
    accs = []
    for name in names:
        reference = evals[t]["tasks"][name]["records"]
        columns = [aligned_correct(name, reference, evals[l]["tasks"][name]["records"])[1] for l in afters]
        patterns, counts = np.unique(np.array(columns, dtype=bool).T, axis=0, return_counts=True)
        n = int(counts.sum())
        draws = rng.multinomial(n, counts / n, size=resamples)  # (resamples, patterns)
        accs.append(100 * (draws @ patterns.astype(float)) / n)  # (resamples, afters)
    return statistic(np.stack(accs, axis=-1))


def forgetting_intervals(evals: dict[int, dict], task_sets: list[list[str]], zero_floor: float | None,
                         resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> dict[str, Any]:
    """Percentile 95 % intervals of mean forgetting(k) and BWT(k) by a paired bootstrap over items: both compare
    the same items across evaluations, so the items are resampled once per replicate for all of them. A k is
    left out when an evaluation it needs has no per-item records."""
    stat = _omega_statistic(zero_floor)
    rng = np.random.default_rng(seed)
    ks = sorted(evals)
    draws: dict[tuple[int, int], np.ndarray] = {}  # (task t, after task l) -> ω_t(l) per replicate
    for t, names in enumerate(task_sets[1:], 2):
        afters = []
        for after in (a for a in ks if a >= t):
            if not all(evals[after]["tasks"].get(n, {}).get("records") for n in names):
                break
            afters.append(after)
        if afters and afters[0] == t:
            for i, w in enumerate(_paired_omega_draws(evals, t, names, afters, rng, stat, resamples).T):
                draws[(t, afters[i])] = w
    mean_forgetting, backward_transfer = {}, {}
    for k in ks:
        earlier = [t for t in range(2, k) if t in evals]  # as in `forgetting_scores`
        if not earlier or any((t, l) not in draws for t in earlier for l in range(t, k + 1)):
            continue
        forget = np.mean([np.max([draws[(t, m)] for m in range(t, k)], axis=0) - draws[(t, k)] for t in earlier],
                         axis=0)
        transfer = np.mean([draws[(t, k)] - draws[(t, t)] for t in earlier], axis=0)
        mean_forgetting[k] = [float(x) for x in np.percentile(forget, [2.5, 97.5])]
        backward_transfer[k] = [float(x) for x in np.percentile(transfer, [2.5, 97.5])]
    return {"mean_forgetting_ci95": mean_forgetting, "backward_transfer_ci95": backward_transfer}


def omegas(rows: list[dict[str, Any]]) -> dict[int, dict[int, float]]:
    """{after_task: {task: ω}}."""
    out: dict[int, dict[int, float]] = {}
    for r in rows:
        out.setdefault(r["after_task"], {})[r["task"]] = r["omega"]
    return out


def forgetting_scores(rows: list[dict[str, Any]], zero_floor: float | None) -> dict[str, Any]:
    """nl_delta and vl_avg keyed by after_task; Δ_t(k), mean forgetting and backward transfer for VL tasks."""
    w = omegas(rows)
    ks = sorted(w)
    nl_delta = {k: w[1][1] - w[k][1] for k in ks if 1 in w and 1 in w[k]}
    vl_avg = {}
    for k in ks:
        accs = [r["accuracy"] for r in rows if r["after_task"] == k and r["task"] > 1]
        if accs:
            vl_avg[k] = hmean(accs, zero_floor)
    delta: dict[int, dict[int, float]] = {}
    mean_forgetting, backward_transfer = {}, {}
    for k in ks:
        earlier = [t for t in range(2, k) if t in w.get(t, {})]
        for t in earlier:
            delta.setdefault(t, {})[k] = w[t][t] - w[k][t]
        if earlier:
            mean_forgetting[k] = sum(max(w[m][t] for m in range(t, k)) - w[k][t] for t in earlier) / len(earlier)
            backward_transfer[k] = sum(w[k][t] - w[t][t] for t in earlier) / len(earlier)
    return {"definitions": __doc__.split("\n\n", 1)[1].strip(), "zero_floor": zero_floor, "nl_delta": nl_delta,
            "vl_avg": vl_avg, "delta": delta, "mean_forgetting": mean_forgetting,
            "backward_transfer": backward_transfer}


def write_matrix(rows: list[dict[str, Any]], path: Path) -> None:
    with atomic_open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({**{c: ("" if r.get(c) is None else r[c]) for c in COLUMNS},
                        "accuracy": f"{r['accuracy']:.4f}", "omega": f"{r['omega']:.4f}"})


def _cell(v: float | None) -> str:
    return "–" if v is None else f"{v:.1f}"


def report_markdown(title: str, method: str, rehearsal: str, task_names: list[str], rows: list[dict[str, Any]],
                    scores: dict[str, Any], replays: dict[int, dict[str, int]]) -> str:
    """ω_t(k) ± 95 % as a table (rows: after task k), then NL Δ (paired interval), VL Avg ±, mean forgetting and
    BWT per row; then every eval set's accuracy with n, ± and chance."""
    w = omegas(rows)
    oci, nci, vci, fci, bci = (scores.get(k, {}) for k in ("omega_ci95", "nl_delta_ci95", "vl_avg_ci95",
                                                          "mean_forgetting_ci95", "backward_transfer_ci95"))
    head = ["after task", *(f"{t}. {n}" for t, n in enumerate(task_names, 1)), "NL Δ [95 % paired]", "VL Avg",
            "mean forgetting", "BWT"]
    lines = [f"# {title}: method {method}, rehearsal {rehearsal}", "",
             ("ω_t(k) (harmonic mean of task t's accuracies, %) after training task k; task 1 is the language "
              "task. ± is half the 95 % interval (bootstrap over items); NL Δ's interval is paired: the same "
              "language items after task 1 and after task k; mean forgetting's and BWT's are paired too (each "
              "eval set's items resampled once for all its evaluations)."),
             "", "| " + " | ".join(head) + " |", "|" + "|".join("---:" for _ in head) + "|"]
    for k in sorted(w):
        nl = scores["nl_delta"].get(k)
        nl_cell = difference_cell(nl, nci.get(k)) if k != 1 and nl is not None else _cell(nl)
        cells = [str(k), *(cell(w[k].get(t), oci.get(k, {}).get(t)) for t in range(1, len(task_names) + 1)),
                 nl_cell, cell(scores["vl_avg"].get(k), vci.get(k)),
                 cell(scores["mean_forgetting"].get(k), fci.get(k)),
                 cell(scores["backward_transfer"].get(k), bci.get(k))]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Per eval set (accuracy % ± half its Wilson 95 % interval):", "",
              "| after task | task | eval set | n | accuracy | chance |", "|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        ci = (r["ci95_lo"], r["ci95_hi"]) if r.get("ci95_lo") is not None else None
        lines.append(f"| {r['after_task']} | {r['task']} | {r['eval_set']} | {r['n'] if r['n'] else '–'} | "
                     f"{cell(r['accuracy'], ci)} | {_cell(r.get('chance'))} |")
    if replays:
        lines += ["", "Replayed examples per task (from each build's stats.json):", ""]
        lines += [f"- task {k}: " + ", ".join(f"{s} {n}" for s, n in sorted(by.items())) for k, by in sorted(replays.items())]
    lines += ["", "Definitions: " + scores["definitions"].replace("\n", " ")]
    return "\n".join(lines) + "\n"


def write_heatmap(rows: list[dict[str, Any]], task_names: list[str], path: Path, title: str,
                  omega_ci: dict[int, dict[int, list[float]]] | None = None) -> None:
    """ω_t(k): rows after task k, columns task t (blank above the diagonal: not yet seen); each cell with ±
    (half its 95 % interval) and the items per task in the caption."""
    w = omegas(rows)
    omega_ci = omega_ci or {}
    n = len(task_names)
    grid = np.full((n, n), np.nan)
    for k, by in w.items():
        for t, v in by.items():
            grid[k - 1, t - 1] = v
    fig = Figure(figsize=(1.4 * n + 2, 1.1 * n + 1.5), dpi=120)  # no pyplot: no global backend or figure state
    ax = fig.subplots()
    im = ax.imshow(grid, vmin=0, vmax=100, cmap="viridis")
    for (i, j), v in np.ndenumerate(grid):
        if not np.isnan(v):
            ci = omega_ci.get(i + 1, {}).get(j + 1)
            text = f"{v:.1f}" + (f"\n±{(ci[1] - ci[0]) / 2:.1f}" if ci else "")
            ax.text(j, i, text, ha="center", va="center", color="white" if v < 60 else "black", fontsize=8)
    labels = [f"{t}. {name}" for t, name in enumerate(task_names, 1)]
    ax.set_xticks(range(n), labels, rotation=30, ha="right")
    ax.set_yticks(range(n), labels)
    ax.set_xlabel("evaluated task t")
    ax.set_ylabel("after training task k")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="ω (%)")
    items = {}
    for r in rows:
        if r.get("n"):
            items.setdefault(r["task"], {})[r["eval_set"]] = r["n"]
    if items:
        caption = "n per task: " + ", ".join(f"{t}. {sum(by.values()):,}" for t, by in sorted(items.items()))
        fig.text(0.01, 0.01, caption + "; ± half the 95 % interval (bootstrap over items)", fontsize=7)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path)


def write_outputs(out: Path, title: str, method: str, rehearsal: str, task_names: list[str],
                  task_sets: list[list[str]], evals: dict[int, dict], zero_floor: float | None,
                  replays: dict[int, dict[str, int]]) -> dict[str, Any]:
    """matrix.csv, forgetting.json, report.md and heatmap.png from the eval files read so far."""
    rows = matrix_rows(evals, task_sets, zero_floor)
    scores = {**forgetting_scores(rows, zero_floor), **intervals(rows, evals, task_sets, zero_floor)}
    write_matrix(rows, out / "matrix.csv")
    write_text_atomic(out / "forgetting.json", json.dumps(scores, indent=2) + "\n")
    write_text_atomic(out / "report.md", report_markdown(title, method, rehearsal, task_names, rows, scores, replays))
    write_heatmap(rows, task_names, out / "heatmap.png", f"{title} ({method}, rehearsal {rehearsal})",
                  scores["omega_ci95"])
    return scores
