"""`mlan ablate`: for each text ratio, build → train → evaluate with the same budget, seed and settings.

One tokenized cache serves every ratio (OUT/cache). Each ratio lives in OUT/ratio-<r>/ (build/, run/,
eval.json, result.json); result.json is written last and atomically, so a ratio that has it is finished
and never redone, and an interrupted ratio continues where it stopped (the build keeps its finished
shards, training resumes from its last checkpoint). The steps run through `mlan.pipeline` (builds and
training runs as `mlan` child processes).
Writes ablation.csv, ablation.md (the shape of MLAN's Table 5) and ablation.png after every ratio: every score
with its n and 95 % interval, the chance levels stated, the plot from 0 with interval bars. Each ratio's
per-item records land in eval.items.jsonl beside eval.json (`mlan compare` pairs two ratios from them).
"""
from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure

from mlan import progress
from mlan.atomic_write import write_text_atomic
from mlan.errors import UserError
from mlan.eval.results_files import load_results
from mlan.eval.stats import cell, score_stats
from mlan.mixture.shards import read_manifest
from mlan.pipeline import Pipeline, Step, build_complete, evaluation, export_complete, results_complete
from mlan.recipe import Recipe, load_recipe

BASE_COLUMNS = ("text_ratio", "tokens_text", "tokens_image_text", "tokens_total", "language_avg", "vision_avg")


def parse_ratios(text: str) -> list[float]:
    """'0,0.25,1' → [0.0, 0.25, 1.0]; every ratio in [0, 1], no repeats."""
    try:
        ratios = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--ratios {text!r}: expected comma-separated numbers, e.g. 0,0.25,0.5,0.75,1.0") from None
    if not ratios:
        raise UserError("--ratios: give at least one ratio")
    bad = [r for r in ratios if not 0.0 <= r <= 1.0]
    if bad:
        raise UserError(f"--ratios: {bad} outside [0, 1] (a ratio is the text share of the budget)")
    if len(set(ratios)) != len(ratios):
        raise UserError(f"--ratios {text!r}: a ratio is repeated")
    return ratios


def ratio_tag(ratio: float) -> str:
    return f"ratio-{ratio:.4f}".rstrip("0").rstrip(".") if ratio not in (0.0, 1.0) else f"ratio-{ratio:.1f}"


@dataclass(frozen=True)
class RatioDir:
    """Where one ratio's build, run and results live."""

    root: Path

    @property
    def build(self) -> Path:
        return self.root / "build"

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def final(self) -> Path:
        return self.root / "run" / "final"

    @property
    def eval(self) -> Path:
        return self.root / "eval.json"

    @property
    def result(self) -> Path:
        return self.root / "result.json"


def _sets(overrides: Sequence[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def ratio_steps(recipe_path: Path, recipe: Recipe, ratio: float, d: RatioDir, cache: Path, nproc: int,
                workers: int | None, overrides: Sequence[str]) -> list[Step]:
    """One ratio's build → train → eval, each skipped by the runner when its output is complete."""
    tag, sets = ratio_tag(ratio), [*overrides, f"mixture.ratio.text={ratio}"]
    build = ["build", str(recipe_path), "--out", str(d.build), "--cache", str(cache), *_sets(sets)]
    if workers:
        build += ["--workers", str(workers)]
    train = ["train", str(recipe_path), "--shards", str(d.build), "--out", str(d.run), "--nproc", str(nproc),
             "--resume", *_sets(sets)]
    ev = recipe.eval
    return [Step("build", tag, d.build, build_complete, argv=tuple(build)),
            Step("train", tag, d.final, export_complete, argv=tuple(train)),
            Step("eval", tag, d.eval, results_complete, note=f"{d.final} on {len(ev.tasks)} task(s)",
                 call=evaluation(str(d.final), ev.tasks, d.eval, batch_size=ev.batch_size, limit=ev.limit,
                                 max_new_tokens=ev.max_new_tokens, reference=ev.reference))]


def run_ratio(recipe_path: Path, recipe: Recipe, ratio: float, d: RatioDir, cache: Path, nproc: int,
              workers: int | None, overrides: Sequence[str], pipeline: Pipeline) -> dict:
    """Build, train and evaluate one ratio (each step skipped when its output is complete); returns its row."""
    d.root.mkdir(parents=True, exist_ok=True)
    evaluated = pipeline.run(ratio_steps(recipe_path, recipe, ratio, d, cache, nproc, workers, overrides))[-1]
    results = evaluated.value if evaluated.ran else load_results(d.eval)
    manifest = read_manifest(str(d.build))
    by_mod = manifest.totals.get("tokens_by_modality", {})
    row = {
        "text_ratio": ratio,
        "tokens_text": int(by_mod.get("text", 0)),
        "tokens_image_text": int(by_mod.get("image_text", 0)),
        "tokens_total": int(manifest.totals["tokens"]),
        "language_avg": results.get("language_avg"),
        "vision_avg": results.get("vision_avg"),
        "groups": {name: t["group"] for name, t in results["tasks"].items()},
        **{name: t["accuracy"] for name, t in results["tasks"].items()},
        **score_stats(results),
    }
    write_text_atomic(d.result, json.dumps(row, indent=2) + "\n")
    return row


def _task_columns(rows: list[dict]) -> tuple[list[str], list[str]]:
    vision, language = [], []
    for row in rows:
        for name, group in row.get("groups", {}).items():
            target = vision if group == "vision" else language
            if name not in target:
                target.append(name)
    return vision, language


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.1f}"
    return str(v)


def _flat(row: dict) -> dict:
    """A row with its intervals, n and chance as flat CSV fields (`<task>_n`, `<task>_ci95_lo`, …)."""
    flat = dict(row)
    for name, st in row.get("stats", {}).items():
        flat.update({f"{name}_n": st["n"], f"{name}_ci95_lo": st["ci95"][0], f"{name}_ci95_hi": st["ci95"][1],
                     f"{name}_chance": st["chance"]})
    for group in ("language", "vision"):
        ci = row.get(f"{group}_avg_ci95")
        if ci:
            flat.update({f"{group}_avg_ci95_lo": ci[0], f"{group}_avg_ci95_hi": ci[1]})
    return flat


def write_csv(rows: list[dict], path: Path) -> None:
    """One line per ratio: tokens, group averages with their interval, then per task accuracy, n, interval, chance."""
    vision, language = _task_columns(rows)
    per_task = lambda name: [name, f"{name}_n", f"{name}_ci95_lo", f"{name}_ci95_hi", f"{name}_chance"]
    cols = [*BASE_COLUMNS, *(f"{g}_avg_ci95_{e}" for g in ("language", "vision") for e in ("lo", "hi")),
            *(c for name in [*vision, *language] for c in per_task(name))]
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for row in map(_flat, rows):
            w.writerow(["" if row.get(c) is None else row.get(c) for c in cols])


def _column_n(rows: list[dict], name: str) -> str:
    """' (n=80)' for a header when every row scored the task on the same number of items."""
    ns = {r.get("stats", {}).get(name, {}).get("n") for r in rows}
    return f" (n={ns.pop()})" if len(ns) == 1 and None not in ns else ""


def _task_cell(row: dict, name: str) -> str:
    st = row.get("stats", {}).get(name)
    return cell(row.get(name), st["ci95"] if st else None)


def chance_note(rows: list[dict]) -> str:
    """The line under a table stating the chance levels and what ± means."""
    vision, language = _task_columns(rows)
    levels = {}
    for row in rows:
        for name, st in row.get("stats", {}).items():
            if st.get("chance") is not None:
                levels.setdefault(name, st["chance"])
    chance = ", ".join(f"{n} {levels[n]:.1f} %" for n in [*vision, *language] if n in levels) or "not recorded"
    return (f"Accuracy % ± half the width of its 95 % interval (Wilson per task; averages: bootstrap over items, "
            f"10,000 resamples). Chance level: {chance}.")


def markdown_table(rows: list[dict]) -> str:
    """MLAN Table 5's shape: % language, vision tasks, vision avg, language tasks, language avg (+ tokens)."""
    vision, language = _task_columns(rows)
    head = ["% language", "text tokens", "image-text tokens", *(n + _column_n(rows, n) for n in vision), "vision avg",
            *(n + _column_n(rows, n) for n in language), "language avg"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---:" for _ in head) + "|"]
    for row in rows:
        cells = [f"{100 * row['text_ratio']:g}", f"{row['tokens_text']:,}", f"{row['tokens_image_text']:,}",
                 *(_task_cell(row, n) for n in vision), cell(row.get("vision_avg"), row.get("vision_avg_ci95")),
                 *(_task_cell(row, n) for n in language), cell(row.get("language_avg"), row.get("language_avg_ci95"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n" + chance_note(rows) + "\n"


def write_plot(rows: list[dict], path: Path, title: str = "") -> None:
    """Language and vision averages (accuracy %) against the text share of the budget: y from 0, 95 % interval
    bars, each group's chance level as a dashed line, n in the caption."""
    fig = Figure(figsize=(6, 4.4), dpi=120)  # no pyplot: no global backend or figure registry to manage
    ax = fig.subplots()
    xs = [100 * r["text_ratio"] for r in rows]
    caption = []
    for (key, label, marker), colour in zip((("language", "language avg", "o"), ("vision", "vision avg", "s")),
                                            ("tab:blue", "tab:orange")):
        pts = [(x, r) for x, r in zip(xs, rows) if r.get(f"{key}_avg") is not None]
        if not pts:
            continue
        ys = [r[f"{key}_avg"] for _, r in pts]
        cis = [r.get(f"{key}_avg_ci95") or (y, y) for (_, r), y in zip(pts, ys)]
        yerr = [[y - c[0] for y, c in zip(ys, cis)], [c[1] - y for y, c in zip(ys, cis)]]
        ax.errorbar([p[0] for p in pts], ys, yerr=yerr, marker=marker, capsize=3, label=label, color=colour)
        chances = [r.get(f"{key}_chance") for _, r in pts if r.get(f"{key}_chance") is not None]
        if chances:
            ax.axhline(chances[0], linestyle="--", linewidth=1, color=colour, label=f"{key} chance")
        ns = sorted({r.get(f"{key}_n") for _, r in pts if r.get(f"{key}_n")})
        if ns:
            caption.append(f"{key}: n = {'/'.join(f'{n:,}' for n in ns)} items per point")
    ax.set_xlabel("text share of the token budget (%)")
    ax.set_ylabel("accuracy (%)")
    ax.set_xlim(-5, 105)
    ax.set_ylim(0, 105)  # from 0: a narrow autoscaled axis makes noise look like a trend
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    if title:
        ax.set_title(title)
    fig.text(0.01, 0.01, "; ".join(caption) + ("; " if caption else "") + "bars: 95 % interval", fontsize=7)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path)


def write_outputs(rows: list[dict], out: Path, title: str = "") -> None:
    rows = sorted(rows, key=lambda r: r["text_ratio"])
    write_csv(rows, out / "ablation.csv")
    write_text_atomic(out / "ablation.md", markdown_table(rows))
    write_plot(rows, out / "ablation.png", title)


def run_ablation(recipe_path: str | Path, ratios: Sequence[float], out: str | Path, nproc: int = 2,
                 workers: int | None = None, overrides: Sequence[str] = (),
                 log: Callable[[str], None] | None = None) -> list[dict]:
    """The sweep; finished ratios are read back, not redone. Returns the rows in ratio order."""
    log = log or (lambda msg: progress.say(f"[mlan ablate] {msg}"))
    recipe_path = Path(recipe_path)
    recipe = load_recipe(recipe_path, list(overrides))
    if not recipe.eval.tasks:
        raise UserError(f"{recipe_path}: eval.tasks is empty; the ablation needs tasks to score each ratio")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cache = out / "cache"
    rows = []
    todo = [r for r in ratios if not RatioDir(out / ratio_tag(r)).result.is_file()]
    pipeline = Pipeline(total=3 * len(todo), log=log)
    for ratio in ratios:
        d = RatioDir(out / ratio_tag(ratio))
        if ratio not in todo:
            log(f"text ratio {ratio:g}: finished earlier ({d.result}), not redone")
            rows.append(json.loads(d.result.read_text()))
            continue
        t0 = time.perf_counter()
        log(f"text ratio {ratio:g}: build → train → eval in {d.root}")
        rows.append(run_ratio(recipe_path, recipe, ratio, d, cache, nproc, workers, overrides, pipeline))
        log(f"text ratio {ratio:g}: done in {time.perf_counter() - t0:.0f}s "
            f"(language {_fmt(rows[-1]['language_avg'])}, vision {_fmt(rows[-1]['vision_avg'])})")
        write_outputs(rows, out, recipe_path.stem)
    write_outputs(rows, out, recipe_path.stem)
    return sorted(rows, key=lambda r: r["text_ratio"])
