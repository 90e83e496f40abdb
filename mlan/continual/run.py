"""`mlan continual RECIPE --out DIR`: the task loop. Each task builds (the normal `mlan build`, one shared cache
in DIR/cache), trains from the previous task's export (the normal `mlan train`), and the export is evaluated on
every task seen so far plus the language set; then matrix.csv, forgetting.json, report.md and heatmap.png are
rewritten from the eval files.

Resumable task by task: a task folder's eval.json is written last and atomically, so a task that has it is
never redone; an interrupted task keeps its finished build and its training resumes from its last checkpoint.
DIR/continual.json records the resolved recipe; rerunning DIR with a different one is an error.
"""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import yaml

from mlan import progress
from mlan.ablate import export_complete
from mlan.atomic_write import write_text_atomic
from mlan.child_process import run_child
from mlan.continual.data import generate_continual_tiny
from mlan.continual.rehearsal import replay_sources, with_replay
from mlan.continual.scores import write_outputs
from mlan.continual.spec import (
    ContinualError,
    ContinualSpec,
    check_tasks,
    load_continual,
    parse_task,
    task_raw,
)
from mlan.eval.harness import evaluate
from mlan.eval.results_files import load_results, save_results
from mlan.recipe import Recipe

Log = Callable[[str], None]


def task_dir(out: Path, k: int, name: str) -> Path:
    return out / f"task-{k + 1}-{name}"


def _mlan(args: list[str], log: Log, step: str = "") -> None:
    """One `mlan` command in a subprocess (its output streams through); failure names the command; `step`
    names the sequence's step in the announcement (`[task-2-colours] train …`)."""
    log(f"[{step}] {args[0]} …  $ mlan {' '.join(args)}" if step else "$ mlan " + " ".join(args))
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "RAY_USAGE_STATS_ENABLED": "0"}
    rc = run_child([sys.executable, "-m", "mlan.cli", *args], env=env)  # dies with this process (kill -9 too)
    if rc != 0:
        raise ContinualError(f"`mlan {args[0]}` failed with status {rc} (command: mlan {' '.join(args)})")


def _atomic_json(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def _claim(out: Path, spec: ContinualSpec) -> None:
    """Record the resolved recipe in DIR/continual.json, or check that a rerun uses the same one."""
    mine = spec.model_dump(mode="json")
    record = out / "continual.json"
    if record.is_file():
        theirs = json.loads(record.read_text())
        if theirs != mine:
            diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            raise ContinualError(f"{out}: was started with a different continual recipe (differs in {', '.join(diff)}); "
                                 "rerun with the same recipe and --set, or choose a new --out")
        return
    out.mkdir(parents=True, exist_ok=True)
    _atomic_json(record, mine)


def base_model_path(spec: ContinualSpec, recipe: Recipe) -> str:
    """What after_task 1 evaluates when the language task trains nothing: the base LLM (or full checkpoint)."""
    m = recipe.model
    path = m.llm or (m.config if m.config not in ("tiny", "compose") else None)
    if not path:
        raise ContinualError(f"tasks.{spec.tasks[0].name}: a language task without sources evaluates the base "
                             "LLM (model.llm or a model.config checkpoint); `tiny` has none, give it sources")
    return path


def _evaluate(model: str, recipe: Recipe, target: Path, log: Log) -> dict:
    ev = recipe.eval
    log(f"evaluating {model} on {', '.join(t.name for t in ev.tasks)}")
    results = evaluate(model, list(ev.tasks), batch_size=ev.batch_size, limit=ev.limit,
                       max_new_tokens=ev.max_new_tokens, keep_records=True)
    save_results(results, target)  # eval.items.jsonl, then eval.json (the task's "finished" mark) last
    return results


def replayed_counts(build: Path) -> dict[str, int]:
    """Documents per rehearsal source in a build, from its stats.json."""
    stats = json.loads((build / "stats.json").read_text())
    return {n: int(c) for n, c in stats["examples"]["by_source"].items() if n.startswith("rehearsal-")}


def run_task(spec: ContinualSpec, k: int, out: Path, start: str | None, recipes: list[Recipe],
             overrides_note: str, log: Log) -> tuple[str, dict]:
    """Build, train and evaluate task k (each step skipped when its output exists); returns (export, results)."""
    task = spec.tasks[k]
    d = task_dir(out, k, task.name)
    d.mkdir(parents=True, exist_ok=True)
    own, budget = list(task.sources), task.budget
    if spec.rehearsal and k >= 2:
        earlier = [(spec.tasks[j].name, recipes[j], len(spec.tasks[j].sources)) for j in range(1, k)]
        replays = replay_sources(spec.rehearsal, earlier, out / "rehearsal")
        own, budget = with_replay(own, budget, replays, task.name)
    raw = task_raw(spec, k, start, own, budget)
    recipe = parse_task(spec, raw, k)
    recipe_file = d / "recipe.yaml"
    recipe_file.write_text(f"# task {k + 1} of {spec.name} ({overrides_note}); written by `mlan continual`\n"
                           + yaml.safe_dump(raw, sort_keys=False))
    if not task.sources:  # the base LLM is task 1
        model = base_model_path(spec, recipe)
    else:
        build, run = d / "build", d / "run"
        if not (build / "manifest.json").is_file():
            args = ["build", str(recipe_file), "--out", str(build), "--cache", str(out / "cache")]
            _mlan(args + (["--workers", str(spec.workers)] if spec.workers else []), log, d.name)
        if not export_complete(run / "final"):
            _mlan(["train", str(recipe_file), "--shards", str(build), "--out", str(run), "--nproc", str(spec.nproc),
                   "--resume"], log, d.name)
        model = str(run / "final")
    return model, _evaluate(model, recipe, d / "eval.json", log)


def run_continual(recipe_path: str | Path, out: str | Path, overrides: Sequence[str] = (),
                  log: Log | None = None) -> dict:
    """The whole sequence; finished tasks are read back, not redone. Returns forgetting.json's content."""
    log = log or (lambda msg: progress.say(f"[mlan continual] {msg}"))
    out = Path(out).resolve()
    spec = load_continual(recipe_path, list(overrides), out)
    recipes = check_tasks(spec)
    _claim(out, spec)
    if spec.generated_data:
        generate_continual_tiny(out / "data")
    names = [t.name for t in spec.tasks]
    task_sets = [[e["name"] for e in t.eval] for t in spec.tasks]
    rehearsal = f"{spec.rehearsal.fraction:g} by {spec.rehearsal.by}" if spec.rehearsal else "none"
    note = f"method {spec.method}, rehearsal {rehearsal}"
    evals: dict[int, dict] = {}
    replays: dict[int, dict[str, int]] = {}
    start: str | None = None
    scores: dict = {}
    for k, task in enumerate(spec.tasks):
        d = task_dir(out, k, task.name)
        if (d / "eval.json").is_file():
            log(f"task {k + 1} ({task.name}): finished earlier, not redone")
            results = load_results(d / "eval.json")  # with its per-item records when the items file exists
            model = results["model"]
        else:
            log(f"task {k + 1} ({task.name}): build → train → eval in {d}")
            model, results = run_task(spec, k, out, start, recipes, note, log)
        evals[k + 1] = results
        if (d / "build" / "stats.json").is_file() and k >= 2 and spec.rehearsal:
            replays[k + 1] = replayed_counts(d / "build")
        start = model if task.sources else None
        scores = write_outputs(out, spec.name, spec.method, rehearsal, names, task_sets, evals, spec.zero_floor,
                               replays)
    return scores
