"""The merge sweep: one merge per (α, K), each scored with `mlan eval`, resumable point by point; its table
and plot."""
from __future__ import annotations

import json
import math
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from matplotlib.figure import Figure

from mlan.atomic_write import write_text_atomic
from mlan.eval.harness import evaluate
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
                                   max_new_tokens=spec.max_new_tokens, images=spec.images)
                point.mkdir(parents=True, exist_ok=True)
                write_text_atomic(results_file, json.dumps(results, indent=2) + "\n")
                if alpha != 0 and not spec.keep_models:
                    shutil.rmtree(model)
            results = json.loads(results_file.read_text())
            rows.append({"alpha": alpha, "density": density, "scope": spec.scope, "direction": spec.direction,
                         "language_avg": results.get("language_avg"), "vision_avg": results.get("vision_avg"),
                         "tasks": {n: t["accuracy"] for n, t in results["tasks"].items()},
                         "point": str(point.relative_to(spec.out))})
    spec.out.mkdir(parents=True, exist_ok=True)
    (spec.out / "sweep.json").write_text(json.dumps(rows, indent=2) + "\n")
    (spec.out / "sweep.md").write_text(sweep_table(rows))
    plot_sweep(rows, spec.out / "sweep.png")
    return rows


def _fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def sweep_table(rows: list[dict]) -> str:
    """A Markdown table: one row per (K, α), language and vision averages, then every task."""
    tasks = list(rows[0]["tasks"]) if rows else []
    head = ["K", "α", "language avg", "vision avg", *tasks]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"{r['density']:g}", f"{r['alpha']:g}", _fmt(r["language_avg"]), _fmt(r["vision_avg"])]
        lines.append("| " + " | ".join(cells + [_fmt(r["tasks"].get(t)) for t in tasks]) + " |")
    return "\n".join(lines) + "\n"


def plot_sweep(rows: list[dict], path: Path) -> None:
    """Language and vision averages against α, one line per K."""
    groups = [g for g in ("language", "vision") if any(r[f"{g}_avg"] is not None for r in rows)]
    fig = Figure(figsize=(5 * max(len(groups), 1), 3.6))  # no pyplot: no backend, no global figure list
    axes = fig.subplots(1, max(len(groups), 1), squeeze=False)
    for ax, group in zip(axes[0], groups):
        for density in sorted({r["density"] for r in rows}):
            pts = sorted((r["alpha"], r[f"{group}_avg"]) for r in rows
                         if r["density"] == density and r[f"{group}_avg"] is not None)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"K = {density:g}")
        ax.set_xlabel("α")
        ax.set_ylabel(f"{group} accuracy (%)")
        ax.set_title(f"{group} vs α")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)

