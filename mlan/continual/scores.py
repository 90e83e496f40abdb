"""The forgetting matrix and the paper's scores, from the per-task eval files.

ω_t(k): harmonic mean (%) of task t's eval-set accuracies after training task k (`zero_floor` replaces a 0
accuracy inside the mean, as the paper's tables suggest 0.1; None keeps the exact limit 0).
NL Δ(k) = ω_1(1) − ω_1(k) (Δ > 0: forgetting). VL Avg(k) = harmonic mean over every VL eval set of tasks 2…k.
Δ_t(k) = ω_t(t) − ω_t(k) for VL t < k; mean forgetting(k) = mean over VL t < k of max_{t≤l<k} ω_t(l) − ω_t(k)
(Chaudhry et al.); backward transfer(k) = mean over VL t < k of ω_t(k) − ω_t(t) (Lopez-Paz & Ranzato).
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

COLUMNS = ("after_task", "task", "eval_set", "accuracy", "omega")


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
            rows.extend({"after_task": k, "task": t, "eval_set": n, "accuracy": a, "omega": w}
                        for n, a in zip(names, accs))
    return rows


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
            w.writerow({**r, "accuracy": f"{r['accuracy']:.4f}", "omega": f"{r['omega']:.4f}"})


def _cell(v: float | None) -> str:
    return "–" if v is None else f"{v:.1f}"


def report_markdown(title: str, method: str, rehearsal: str, task_names: list[str], rows: list[dict[str, Any]],
                    scores: dict[str, Any], replays: dict[int, dict[str, int]]) -> str:
    """ω_t(k) as a table (rows: after task k), then NL Δ, VL Avg, mean forgetting and BWT per row."""
    w = omegas(rows)
    head = ["after task", *(f"{t}. {n}" for t, n in enumerate(task_names, 1)), "NL Δ", "VL Avg",
            "mean forgetting", "BWT"]
    lines = [f"# {title}: method {method}, rehearsal {rehearsal}", "",
             "ω_t(k) (harmonic mean of task t's accuracies, %) after training task k; task 1 is the language task.",
             "", "| " + " | ".join(head) + " |", "|" + "|".join("---:" for _ in head) + "|"]
    for k in sorted(w):
        cells = [str(k), *(_cell(w[k].get(t)) for t in range(1, len(task_names) + 1)),
                 *(_cell(scores[key].get(k)) for key in ("nl_delta", "vl_avg", "mean_forgetting", "backward_transfer"))]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Per eval set (accuracy %):", "", "| after task | task | eval set | accuracy |", "|---:|---:|---|---:|"]
    lines += [f"| {r['after_task']} | {r['task']} | {r['eval_set']} | {r['accuracy']:.1f} |" for r in rows]
    if replays:
        lines += ["", "Replayed examples per task (from each build's stats.json):", ""]
        lines += [f"- task {k}: " + ", ".join(f"{s} {n}" for s, n in sorted(by.items())) for k, by in sorted(replays.items())]
    lines += ["", "Definitions: " + scores["definitions"].replace("\n", " ")]
    return "\n".join(lines) + "\n"


def write_heatmap(rows: list[dict[str, Any]], task_names: list[str], path: Path, title: str) -> None:
    """ω_t(k): rows after task k, columns task t (blank above the diagonal: not yet seen)."""
    w = omegas(rows)
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
            ax.text(j, i, f"{v:.1f}", ha="center", va="center", color="white" if v < 60 else "black", fontsize=9)
    labels = [f"{t}. {name}" for t, name in enumerate(task_names, 1)]
    ax.set_xticks(range(n), labels, rotation=30, ha="right")
    ax.set_yticks(range(n), labels)
    ax.set_xlabel("evaluated task t")
    ax.set_ylabel("after training task k")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="ω (%)")
    fig.tight_layout()
    fig.savefig(path)


def write_outputs(out: Path, title: str, method: str, rehearsal: str, task_names: list[str],
                  task_sets: list[list[str]], evals: dict[int, dict], zero_floor: float | None,
                  replays: dict[int, dict[str, int]]) -> dict[str, Any]:
    """matrix.csv, forgetting.json, report.md and heatmap.png from the eval files read so far."""
    rows = matrix_rows(evals, task_sets, zero_floor)
    scores = forgetting_scores(rows, zero_floor)
    write_matrix(rows, out / "matrix.csv")
    write_text_atomic(out / "forgetting.json", json.dumps(scores, indent=2) + "\n")
    write_text_atomic(out / "report.md", report_markdown(title, method, rehearsal, task_names, rows, scores, replays))
    write_heatmap(rows, task_names, out / "heatmap.png", f"{title} ({method}, rehearsal {rehearsal})")
    return scores
