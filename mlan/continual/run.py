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
from collections.abc import Callable, Sequence
from pathlib import Path

import yaml

from mlan import progress
from mlan.atomic_write import write_text_atomic
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
from mlan.eval.results_files import load_results
from mlan.pipeline import Pipeline, Step, build_complete, evaluation, export_complete, results_complete
from mlan.recipe import Recipe

Log = Callable[[str], None]


def task_dir(out: Path, k: int, name: str) -> Path:
    return out / f"task-{k + 1}-{name}"


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


def replayed_counts(build: Path) -> dict[str, int]:
    """Documents per rehearsal source in a build, from its stats.json."""
    stats = json.loads((build / "stats.json").read_text())
    return {n: int(c) for n, c in stats["examples"]["by_source"].items() if n.startswith("rehearsal-")}


def task_steps(spec: ContinualSpec, k: int, out: Path, recipe_file: Path, recipe: Recipe, model: str) -> list[Step]:
    """Task k's build → train (when it has sources) → eval of `model`, each skipped when its output is complete."""
    d = task_dir(out, k, spec.tasks[k].name)
    steps = []
    if spec.tasks[k].sources:
        build, run = d / "build", d / "run"
        args = ["build", str(recipe_file), "--out", str(build), "--cache", str(out / "cache")]
        steps += [Step("build", d.name, build, build_complete,
                       argv=tuple(args + (["--workers", str(spec.workers)] if spec.workers else []))),
                  Step("train", d.name, run / "final", export_complete,
                       argv=("train", str(recipe_file), "--shards", str(build), "--out", str(run), "--nproc",
                             str(spec.nproc), "--resume"))]
    ev = recipe.eval
    steps.append(Step("eval", d.name, d / "eval.json", results_complete,
                      note=f"{model} on {', '.join(t.name for t in ev.tasks)}",
                      call=evaluation(model, ev.tasks, d / "eval.json", batch_size=ev.batch_size, limit=ev.limit,
                                      max_new_tokens=ev.max_new_tokens)))
    return steps


def run_task(spec: ContinualSpec, k: int, out: Path, start: str | None, recipes: list[Recipe],
             overrides_note: str, pipeline: Pipeline) -> tuple[str, dict]:
    """Build, train and evaluate task k (each step skipped when its output is complete); returns (export, results)."""
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
    # the base LLM is task 1 when it trains nothing
    model = str(d / "run" / "final") if task.sources else base_model_path(spec, recipe)
    evaluated = pipeline.run(task_steps(spec, k, out, recipe_file, recipe, model))[-1]
    return model, evaluated.value if evaluated.ran else load_results(d / "eval.json")


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
    todo = [k for k, t in enumerate(spec.tasks) if not (task_dir(out, k, t.name) / "eval.json").is_file()]
    pipeline = Pipeline(total=sum(3 if spec.tasks[k].sources else 1 for k in todo), log=log)
    for k, task in enumerate(spec.tasks):
        d = task_dir(out, k, task.name)
        if k not in todo:
            log(f"task {k + 1} ({task.name}): finished earlier, not redone")
            results = load_results(d / "eval.json")  # with its per-item records when the items file exists
            model = results["model"]
        else:
            log(f"task {k + 1} ({task.name}): build → train → eval in {d}")
            model, results = run_task(spec, k, out, start, recipes, note, pipeline)
        evals[k + 1] = results
        if (d / "build" / "stats.json").is_file() and k >= 2 and spec.rehearsal:
            replays[k + 1] = replayed_counts(d / "build")
        start = model if task.sources else None
        scores = write_outputs(out, spec.name, spec.method, rehearsal, names, task_sets, evals, spec.zero_floor,
                               replays)
    return scores
