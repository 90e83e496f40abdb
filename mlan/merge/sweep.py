"""The merge sweep: one merge per (α, K), each scored with `mlan eval`, resumable point by point; its table
(every score with n and ± 95 %, the chance levels, each merge's paired difference from the VLM at α = 0) and
its plot (from 0, interval bars, chance line, n in the caption)."""
from __future__ import annotations

import json
import math
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from matplotlib.figure import Figure

from mlan.eval.harness import evaluate
from mlan.eval.results_files import load_results, save_results
from mlan.eval.stats import (
    PairedCounts,
    aligned_correct,
    cell,
    difference_cell,
    paired_counts,
    paired_group_difference,
    score_stats,
)
from mlan.merge.merge import Direction, MergeConfig, Scope, merge_checkpoints
from mlan.merge.tensors import MergeError


def _point_name(alpha: float, density: float) -> str:
    return "vlm" if alpha == 0 else f"alpha{alpha:g}_density{density:g}"


@dataclass(frozen=True)
class SweepSpec:
    """A grid of merges, each scored with `mlan eval`."""

    vlm: str
    llm: str
    alphas: tuple[float, ...]
    densities: tuple[float, ...]
    tasks: tuple[str, ...]
    out: Path
    scope: Scope = "tensor"
    direction: Direction = "toward-llm"
    limit: int | None = None
    batch_size: int = 8
    max_new_tokens: int = 64
    images: str | None = None
    keep_models: bool = False


def _claim_sweep_folder(spec: SweepSpec) -> None:
    """Record what the folder's points were scored with; resuming with other settings would mix them."""
    free = ("alphas", "densities", "out", "keep_models", "batch_size")  # may change between runs
    what = {k: v for k, v in asdict(spec).items() if k not in free}
    what["tasks"] = list(what["tasks"])
    marker = spec.out / "sweep-spec.json"
    if marker.is_file():
        before = json.loads(marker.read_text())
        changed = sorted(k for k in what if before.get(k) != what[k])
        if changed:
            raise MergeError(f"{spec.out} holds a sweep with other {', '.join(changed)}; use another --out")
    spec.out.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(what, indent=2) + "\n")


def merge_sweep(spec: SweepSpec) -> list[dict]:
    """One merge per (α, K), evaluated and (unless kept) deleted; α = 0 is the VLM itself, scored once.

    Each point's results land in OUT/points/<name>/results.json as soon as it is scored, so a stopped
    sweep resumes where it stopped. Writes OUT/sweep.json, OUT/sweep.md and OUT/sweep.png.
    """
    for a in spec.alphas:
        if not math.isfinite(a):
            raise MergeError(f"--alphas must be finite, got {a}")
    for k in spec.densities:
        MergeConfig(alpha=0.0, density=k)  # validates K
    _claim_sweep_folder(spec)
    rows: list[dict] = []
    for density in spec.densities:
        for alpha in spec.alphas:
            point = spec.out / "points" / _point_name(alpha, density)
            results_file = point / "results.json"
            if not results_file.is_file():
                model = spec.vlm
                if alpha != 0:
                    model = str(point / "model")
                    shutil.rmtree(model, ignore_errors=True)  # a half-written merge from a stopped sweep
                    merge_checkpoints(spec.vlm, spec.llm, model, MergeConfig(
                        alpha=alpha, density=density, scope=spec.scope, direction=spec.direction),
                        progress=sys.stderr.isatty())
                results = evaluate(model, list(spec.tasks), batch_size=spec.batch_size, limit=spec.limit,
                                   max_new_tokens=spec.max_new_tokens, images=spec.images, keep_records=True)
                point.mkdir(parents=True, exist_ok=True)
                save_results(results, results_file)  # results.json + results.items.jsonl
                if alpha != 0 and not spec.keep_models:
                    shutil.rmtree(model)
            results = load_results(results_file)
            rows.append({"alpha": alpha, "density": density, "scope": spec.scope, "direction": spec.direction,
                         "language_avg": results.get("language_avg"), "vision_avg": results.get("vision_avg"),
                         "tasks": {n: t["accuracy"] for n, t in results["tasks"].items()},
                         "groups": {n: t["group"] for n, t in results["tasks"].items()},
                         "point": str(point.relative_to(spec.out)), **score_stats(results),
                         "_records": {n: t.get("records") for n, t in results["tasks"].items()}})
    add_paired_differences(rows)
    for r in rows:
        r.pop("_records")
    spec.out.mkdir(parents=True, exist_ok=True)
    (spec.out / "sweep.json").write_text(json.dumps(rows, indent=2) + "\n")
    (spec.out / "sweep.md").write_text(sweep_table(rows))
    plot_sweep(rows, spec.out / "sweep.png")
    return rows


def add_paired_differences(rows: list[dict]) -> None:
    """Each merge's group averages minus the VLM's (α = 0), paired item by item: `<group>_vs_vlm` =
    {difference, ci95} (points); absent when either side has no per-item records."""
    vlm = next((r for r in rows if r["alpha"] == 0 and r["_records"]), None)
    if vlm is None:
        return
    for r in rows:
        if r["alpha"] == 0 or not all(r["_records"].values()):
            continue
        for group in ("language", "vision"):
            names = [n for n, g in r["groups"].items() if g == group and vlm["_records"].get(n)]
            if not names:
                continue
            tables: list[PairedCounts] = [paired_counts(*aligned_correct(n, vlm["_records"][n], r["_records"][n]))
                                          for n in names]
            diff, ci = paired_group_difference(tables)
            r[f"{group}_vs_vlm"] = {"difference": diff, "ci95": list(ci)}


def _stat_cell(r: dict, name: str) -> str:
    st = r.get("stats", {}).get(name)
    return cell(r["tasks"].get(name), st["ci95"] if st else None)


def _vs_vlm_cell(r: dict, group: str) -> str:
    d = r.get(f"{group}_vs_vlm")
    return difference_cell(d["difference"], d["ci95"]) if d else "–"


def sweep_table(rows: list[dict]) -> str:
    """A Markdown table: one row per (K, α), language and vision averages with their paired difference from the
    VLM (α = 0), then every task; n in the headers, the chance levels under the table."""
    tasks = list(rows[0]["tasks"]) if rows else []
    n_of = lambda t: next((r["stats"][t]["n"] for r in rows if t in r.get("stats", {})), None)
    head = ["K", "α", "language avg", "Δ language vs α=0", "vision avg", "Δ vision vs α=0",
            *(f"{t} (n={n_of(t)})" if n_of(t) else t for t in tasks)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"{r['density']:g}", f"{r['alpha']:g}", cell(r["language_avg"], r.get("language_avg_ci95")),
                 _vs_vlm_cell(r, "language"), cell(r["vision_avg"], r.get("vision_avg_ci95")),
                 _vs_vlm_cell(r, "vision")]
        lines.append("| " + " | ".join(cells + [_stat_cell(r, t) for t in tasks]) + " |")
    chance = {t: r["stats"][t]["chance"] for r in rows for t in r.get("stats", {})
              if r["stats"][t].get("chance") is not None}
    note = ("Accuracy % ± half the 95 % interval (Wilson per task, bootstrap over items for averages); Δ: merge "
            "minus the VLM (α = 0) in points, paired bootstrap 95 % interval over the same items. Chance level: "
            + (", ".join(f"{t} {c:.1f} %" for t, c in chance.items()) or "not recorded") + ".")
    return "\n".join(lines) + "\n\n" + note + "\n"


def plot_sweep(rows: list[dict], path: Path) -> None:
    """Language and vision averages against α, one line per K: y from 0, 95 % interval bars, the chance level
    dashed, n in the caption."""
    groups = [g for g in ("language", "vision") if any(r[f"{g}_avg"] is not None for r in rows)]
    fig = Figure(figsize=(5 * max(len(groups), 1), 3.9))  # no pyplot: no backend, no global figure list
    axes = fig.subplots(1, max(len(groups), 1), squeeze=False)
    caption = []
    for ax, group in zip(axes[0], groups):
        for density in sorted({r["density"] for r in rows}):
            pts = sorted(((r["alpha"], r) for r in rows if r["density"] == density and r[f"{group}_avg"] is not None),
                         key=lambda p: p[0])
            ys = [r[f"{group}_avg"] for _, r in pts]
            cis = [r.get(f"{group}_avg_ci95") or (y, y) for (_, r), y in zip(pts, ys)]
            ax.errorbar([p[0] for p in pts], ys, yerr=[[y - c[0] for y, c in zip(ys, cis)],
                                                       [c[1] - y for y, c in zip(ys, cis)]],
                        marker="o", capsize=3, label=f"K = {density:g}")
        chance = next((r.get(f"{group}_chance") for r in rows if r.get(f"{group}_chance") is not None), None)
        if chance is not None:
            ax.axhline(chance, linestyle="--", linewidth=1, color="grey", label="chance")
        n = next((r.get(f"{group}_n") for r in rows if r.get(f"{group}_n")), None)
        if n:
            caption.append(f"{group}: n = {n:,} items per point")
        ax.set_ylim(0, 105)  # from 0: an autoscaled axis makes noise look like a trend
        ax.set_xlabel("α")
        ax.set_ylabel(f"{group} accuracy (%)")
        ax.set_title(f"{group} vs α")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.text(0.01, 0.01, "; ".join(caption) + ("; " if caption else "") + "bars: 95 % interval", fontsize=7)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=120)
