"""`mlan ablate`: for each text ratio, build → train → evaluate with the same budget, seed and settings.

One tokenized cache serves every ratio (OUT/cache). Each ratio lives in OUT/ratio-<r>/ (build/, run/,
eval.json, result.json); result.json is written last and atomically, so a ratio that has it is finished
and never redone, and an interrupted ratio continues where it stopped (the build keeps its finished
shards, training resumes from its last checkpoint). Builds and training runs are `mlan` subprocesses.
Writes ablation.csv, ablation.md (the shape of MLAN's Table 5) and ablation.png after every ratio.
"""
from __future__ import annotations

import csv
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure
from safetensors import safe_open

from mlan import progress
from mlan.atomic_write import write_text_atomic
from mlan.child_process import run_child
from mlan.errors import UserError
from mlan.eval.harness import evaluate
from mlan.mixture.shards import read_manifest
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


def export_complete(final: Path) -> bool:
    """A `save_pretrained` folder with a config, a tokenizer and weight files whose headers and sizes agree."""
    if not (final / "config.json").is_file() or not (final / "tokenizer.json").is_file():
        return False
    weights = sorted(final.glob("*.safetensors"))
    if not weights:
        return False
    for w in weights:
        try:
            with safe_open(str(w), framework="pt") as f:  # truncated files fail the header/size check
                names = list(f.keys())
        except Exception:  # noqa: BLE001 - any unreadable file means: not complete
            return False
        if not names:
            return False
    return True


def _mlan(args: list[str], log: Callable[[str], None], step: str = "") -> None:
    """Run one `mlan` command in a subprocess; its output streams through; failure names the command. `step`
    names the sweep's step in the announcement (`[ratio-0.25] train …`)."""
    cmd = [sys.executable, "-m", "mlan.cli", *args]
    log(f"[{step}] {args[0]} …  $ mlan {' '.join(args)}" if step else "$ mlan " + " ".join(args))
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    rc = run_child(cmd, env=env)  # own process group, dies with this process (kill -9 included)
    if rc != 0:
        raise UserError(f"`mlan {' '.join(args[:1])}` failed with status {rc} (command: mlan {' '.join(args)})")


def _sets(overrides: Sequence[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def run_ratio(recipe_path: Path, recipe: Recipe, ratio: float, d: RatioDir, cache: Path, nproc: int,
              workers: int | None, overrides: Sequence[str], log: Callable[[str], None]) -> dict:
    """Build, train and evaluate one ratio (each step skipped when its output exists); returns its row."""
    d.root.mkdir(parents=True, exist_ok=True)
    sets = [*overrides, f"mixture.ratio.text={ratio}"]
    if not (d.build / "manifest.json").is_file():
        args = ["build", str(recipe_path), "--out", str(d.build), "--cache", str(cache), *_sets(sets)]
        if workers:
            args += ["--workers", str(workers)]
        _mlan(args, log, ratio_tag(ratio))
    if not export_complete(d.final):
        train = ["train", str(recipe_path), "--shards", str(d.build), "--out", str(d.run), "--nproc", str(nproc),
                 "--resume", *_sets(sets)]
        _mlan(train, log, ratio_tag(ratio))
    if d.eval.is_file():
        results = json.loads(d.eval.read_text())
    else:
        ev = recipe.eval
        log(f"[{ratio_tag(ratio)}] eval … {d.final} on {len(ev.tasks)} task(s)")
        results = evaluate(str(d.final), list(ev.tasks), batch_size=ev.batch_size, limit=ev.limit,
                           max_new_tokens=ev.max_new_tokens, reference=ev.reference)
        write_text_atomic(d.eval, json.dumps(results, indent=2) + "\n")
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


def write_csv(rows: list[dict], path: Path) -> None:
    vision, language = _task_columns(rows)
    cols = [*BASE_COLUMNS, *vision, *language]
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for row in rows:
            w.writerow(["" if row.get(c) is None else row.get(c) for c in cols])


def markdown_table(rows: list[dict]) -> str:
    """MLAN Table 5's shape: % language, vision tasks, vision avg, language tasks, language avg (+ tokens)."""
    vision, language = _task_columns(rows)
    head = ["% language", "text tokens", "image-text tokens", *vision, "vision avg", *language, "language avg"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---:" for _ in head) + "|"]
    for row in rows:
        cells = [f"{100 * row['text_ratio']:g}", f"{row['tokens_text']:,}", f"{row['tokens_image_text']:,}",
                 *(_fmt(row.get(n)) for n in vision), _fmt(row.get("vision_avg")),
                 *(_fmt(row.get(n)) for n in language), _fmt(row.get("language_avg"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_plot(rows: list[dict], path: Path, title: str = "") -> None:
    """Language and vision score (accuracy %) against the text share of the budget."""
    fig = Figure(figsize=(6, 4), dpi=120)  # no pyplot: no global backend or figure registry to manage
    ax = fig.subplots()
    xs = [100 * r["text_ratio"] for r in rows]
    for key, label, marker in (("language_avg", "language avg", "o"), ("vision_avg", "vision avg", "s")):
        pts = [(x, r[key]) for x, r in zip(xs, rows) if r.get(key) is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=label)
    ax.set_xlabel("text share of the token budget (%)")
    ax.set_ylabel("accuracy (%)")
    ax.set_xlim(-5, 105)
    ax.set_ylim(-2, 105)  # points at 0 or 100 stay visible
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    if title:
        ax.set_title(title)
    fig.tight_layout()
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
    for ratio in ratios:
        d = RatioDir(out / ratio_tag(ratio))
        if d.result.is_file():
            log(f"text ratio {ratio:g}: finished earlier ({d.result}), not redone")
            rows.append(json.loads(d.result.read_text()))
            continue
        t0 = time.perf_counter()
        log(f"text ratio {ratio:g}: build → train → eval in {d.root}")
        rows.append(run_ratio(recipe_path, recipe, ratio, d, cache, nproc, workers, overrides, log))
        log(f"text ratio {ratio:g}: done in {time.perf_counter() - t0:.0f}s "
            f"(language {_fmt(rows[-1]['language_avg'])}, vision {_fmt(rows[-1]['vision_avg'])})")
        write_outputs(rows, out, recipe_path.stem)
    write_outputs(rows, out, recipe_path.stem)
    return sorted(rows, key=lambda r: r["text_ratio"])
