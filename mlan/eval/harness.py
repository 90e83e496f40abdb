"""`mlan eval`: zero-shot scoring of a causal LM, LLaVA or Mllama model directory on benchmark files.

This module loads the model, gives the scorers (mlan.eval.scoring) a batch's image inputs, and runs the
tasks into a results dict with group averages and forgetting. Prompts are rendered as the build renders
them (mlan.eval.prompts); answers are extracted in mlan.eval.answers. Accuracies are percentages.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

from mlan import progress
from mlan.atomic_write import write_text_atomic
from mlan.errors import UserError
from mlan.eval.forgetting import forgetting
from mlan.eval.loading import Loaded, load_model, model_inputs
from mlan.eval.protocols import chat_cloze
from mlan.eval.scoring import score_choice, score_cloze, score_generate
from mlan.eval.stats import chance_level, majority_rate, wilson_ci
from mlan.eval.tasks import Task, load_task, parse_task_arg, read_ids


# ---------------------------------------------------------------- the run
def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


LM_EVAL_PREFIX = "lm-eval:"

# (task name, items done so far, items in the task): the one progress hook (a TTY bar by default)
ProgressCallback = Callable[[str, int, int], None]


@contextmanager
def _logged_progress() -> Iterator[ProgressCallback]:
    """mlan.progress per task: a bar on a terminal; in a log, a line every 30 s / 10 % with items/s and ETA."""
    with ExitStack() as stack:
        bars: dict[str, progress.Task] = {}

        def update(name: str, done: int, total: int) -> None:
            if name not in bars:
                bars[name] = stack.enter_context(progress.task(f"eval {name}", total=total, unit="items"))
            bars[name].update(done)
            if done >= total:
                bars[name].close()  # the task's last line now, not when the whole run ends

        yield update


def _pct(correct: int, n: int) -> dict:
    return {"value": 100.0 * correct / n, "ci95": list(wilson_ci(correct, n))}


def task_entry(task: Task, records: list[dict]) -> dict:
    """A task's score in the contract (design.md "A score"): n, accuracy, Wilson ci95, chance, majority,
    protocol and metric, and for lm-eval `acc` / `acc_norm` with their intervals. n = 0 is a UserError."""
    n = len(records)
    if n == 0:
        raise UserError(f"{task.path}: task {task.name!r} has no item to score (n = 0)")
    correct = sum(bool(r["correct"]) for r in records)
    entry: dict[str, Any] = {
        "n": n, "accuracy": 100.0 * correct / n, "ci95": list(wilson_ci(correct, n)),
        # a random pick among the options; free generation (no options) has no chance level
        "chance": chance_level([len(it.choices) for it in task.items]) if all(it.choices for it in task.items)
        else 0.0,
        "majority": majority_rate([str(r["gold"]) for r in records]),
        "protocol": task.protocol, "metric": "acc" if task.kind == "choice" else "exact_match",
        "group": task.group, "kind": task.kind, "format": task.format, "path": task.path,
    }
    if task.protocol == "lm-eval":
        entry["acc"] = _pct(correct, n)
        if all("correct_norm" in r for r in records):
            entry["acc_norm"] = _pct(sum(bool(r["correct_norm"]) for r in records), n)
        entry["prompt"] = task.style
    if task.skipped:
        entry["skipped"] = len(task.skipped)  # records that do not parse into question and options
    return entry


def _pooled(results: dict, group: str, records: dict[str, list[dict]]) -> dict | None:
    """A group's items pooled over its tasks: total n, accuracy over all items and its interval."""
    names = [name for name, t in results["tasks"].items() if t["group"] == group]
    if not names:
        return None
    n = sum(results["tasks"][k]["n"] for k in names)
    correct = sum(bool(r["correct"]) for k in names for r in records[k])
    return {"n": n, "accuracy": 100.0 * correct / n, "ci95": list(wilson_ci(correct, n)), "tasks": names}


def _chat_rendered(lm: Loaded, task: Task) -> Task:
    """lm-eval's `--apply_chat_template`: each context becomes a user turn of the tokenizer's chat template."""
    if getattr(lm.tokenizer, "chat_template", None) is None:
        raise UserError(f"{lm.tokenizer.name_or_path}: --chat-template, but the tokenizer has no chat template")

    def render(text: str) -> str:
        return lm.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                add_generation_prompt=True)

    items = [replace(it, cloze=chat_cloze(it.cloze, render)) if it.cloze else it for it in task.items]
    return replace(task, items=items)


def score_task(lm: Loaded, task: Task, batch_size: int = 8, max_new_tokens: int = 64,
               progress: Callable[[int], object] = lambda n: None, chat_template: bool = False) -> list[dict]:
    """The per-item records (the items.jsonl lines) of one task, scored by its protocol."""
    if task.group == "vision" and lm.family is None:
        raise UserError(f"{task.path}: image task, but the model is a text-only causal LM")
    if task.protocol == "lm-eval":
        return score_cloze(lm, _chat_rendered(lm, task) if chat_template else task, batch_size, progress)
    if task.kind == "choice":
        return score_choice(lm, task, batch_size, progress, model_inputs(lm))[1]
    new_tokens = task.max_new_tokens or max_new_tokens
    return score_generate(lm, task, batch_size, new_tokens, progress, model_inputs(lm))[1]


def evaluate_tasks(lm: Loaded, tasks: list[Task], batch_size: int = 8, max_new_tokens: int = 64,
                   keep_records: bool = False, *, chat_template: bool = False,
                   progress: ProgressCallback | None = None, score: Callable[..., list[dict]] | None = None) -> dict:
    """Score loaded tasks; returns the results dict (see `evaluate`). `score` replaces `score_task` (the
    distributed runner scores its share of the items and gathers them)."""
    results: dict[str, Any] = {"tasks": {}}
    records: dict[str, list[dict]] = {}
    score = score or score_task
    with nullcontext(progress) if progress else _logged_progress() as report:
        for task in tasks:
            done = [0]

            def step(k: int, name: str = task.name, total: int = len(task.items), done: list = done) -> None:
                done[0] += k
                report(name, done[0], total)

            recs = score(lm, task, batch_size, max_new_tokens, step, chat_template)
            records[task.name] = recs
            entry = task_entry(task, recs)
            if keep_records:
                entry["records"] = recs
            results["tasks"][task.name] = entry
    return summarize_groups(results, records)


def summarize_groups(results: dict, records: dict[str, list[dict]]) -> dict:
    """Each group's mean task accuracy (`language_avg`, `vision_avg`) and its items pooled (`groups`)."""
    results["groups"] = {}
    for group in ("language", "vision"):
        accs = [t["accuracy"] for t in results["tasks"].values() if t["group"] == group]
        results[f"{group}_avg"] = _mean(accs)
        pooled = _pooled(results, group, records)
        if pooled:
            results["groups"][group] = pooled
    return results


def items_path(path: str | Path) -> Path:
    """FILE.json → FILE.items.jsonl (the per-item file beside the results)."""
    p = Path(path)
    return p.with_name((p.name.removesuffix(".json")) + ".items.jsonl")


def write_results(results: dict, path: str | Path) -> None:
    """FILE.json (the results without records) and FILE.items.jsonl (one line per item, task then item order).

    Every task must carry its records (evaluate(..., keep_records=True)): the per-item file is the contract."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    clean = {**results, "tasks": {}}
    for name, t in results["tasks"].items():
        if "records" not in t:
            raise ValueError(f"task {name!r} has no records: evaluate with keep_records=True")
        lines += [json.dumps(r) for r in t["records"]]
        clean["tasks"][name] = {**{k: v for k, v in t.items() if k != "records"},
                                "items_file": items_path(path).name}
    write_text_atomic(items_path(path), "".join(line + "\n" for line in lines))
    write_text_atomic(path, json.dumps(clean, indent=2) + "\n")


def _as_task(spec: Any, limit: int | None, images: str | None, image_pattern: str | None = None,
             protocol: str = "lm-eval", items: dict | None = None) -> Task:
    if isinstance(spec, Task):
        return spec
    if isinstance(spec, (str, Path)):
        name, path = parse_task_arg(str(spec))
        return load_task(path, name, images=images, limit=limit, image_pattern=image_pattern, protocol=protocol,
                         items=items)
    # an EvalTaskSpec (recipe) or a dict with its keys; `source_spec`: the recipe's training source of `source`
    if isinstance(spec, dict) and spec.get("source") is not None and spec.get("source_spec") is None:
        raise UserError(f"task {spec.get('name')!r}: source {spec['source']!r} is resolved only inside a recipe")
    get = (lambda k: getattr(spec, k, None)) if not isinstance(spec, dict) else spec.get
    return load_task(get("path"), get("name"), kind=get("kind"), format=get("format"), group=get("group"),
                     images=get("images") or images, limit=limit if limit is not None else get("limit"),
                     image_pattern=get("image_pattern") or image_pattern, protocol=get("protocol") or protocol,
                     items=items, source=get("source_spec"))


def load_tasks(tasks: list, limit: int | None = None, images: str | None = None, image_pattern: str | None = None,
               protocol: str = "lm-eval", items: str | Path | None = None) -> list[Task]:
    """Every task read (and checked) before any model is loaded; names must be unique."""
    ids = read_ids(items) if items is not None else None
    loaded_tasks = [_as_task(t, limit, images, image_pattern, protocol, ids) for t in tasks]
    names = [t.name for t in loaded_tasks]
    if len(set(names)) != len(names):
        raise UserError(f"task names must be unique; got {names} (use NAME=PATH)")
    return loaded_tasks


def evaluate(model_path: str, tasks: list, batch_size: int = 8, limit: int | None = None,
             max_new_tokens: int = 64, images: str | None = None, reference: str | None = None,
             keep_records: bool = False, image_pattern: str | None = None, *, protocol: str = "lm-eval",
             chat_template: bool = False, items: str | Path | None = None,
             progress: ProgressCallback | None = None) -> dict:
    """Evaluate a model directory on task files / NAME=PATH strings / recipe task specs.

    Returns the score contract (docs/eval.md): {"model", "protocol", "chat_template", "tasks": {name: {n,
    accuracy (%), ci95, chance, majority, protocol, metric, group, kind, format, path, [acc, acc_norm],
    [records]}}, "language_avg", "vision_avg", "groups"} plus "forgetting" ({omega, reference_omega, delta} per
    group) when `reference` is a results file.
    """
    bridged = [str(t) for t in tasks if is_lm_eval_task(t)]
    loaded_tasks = load_tasks([t for t in tasks if not is_lm_eval_task(t)], limit, images, image_pattern, protocol,
                              items)
    if loaded_tasks:
        lm = load_model(str(model_path))
        scored = evaluate_tasks(lm, loaded_tasks, batch_size, max_new_tokens, keep_records or bool(bridged),
                                chat_template=chat_template, progress=progress)
    else:
        scored = {"tasks": {}}
    if bridged:  # pooled with mlan's own tasks: every task's records are needed until the groups are summed
        scored = _with_lm_eval_tasks(scored, str(model_path), bridged, limit, batch_size)
        if not keep_records:
            for entry in scored["tasks"].values():
                entry.pop("records", None)
    results = {"model": str(model_path), "protocol": protocol, "chat_template": chat_template, **scored}
    return with_reference(results, reference)


def is_lm_eval_task(spec: Any) -> bool:
    """`lm-eval:NAME` (a registered lm-evaluation-harness task or a task YAML): run by the harness itself."""
    return isinstance(spec, (str, Path)) and str(spec).startswith(LM_EVAL_PREFIX)


def _with_lm_eval_tasks(scored: dict, model_path: str, specs: list[str], limit: int | None,
                        batch_size: int) -> dict:
    """lm-evaluation-harness's own tasks scored beside mlan's (which carry their records), in the score contract."""
    from mlan.eval.lm_eval_bridge import run_lm_eval_task  # lazy: lm-eval is an optional extra

    for spec in specs:
        entry, recs = run_lm_eval_task(model_path, spec.removeprefix(LM_EVAL_PREFIX), limit, batch_size)
        name = entry["lm_eval"]["task"]
        if name in scored["tasks"]:
            raise UserError(f"{spec}: task name {name!r} is already taken by another task")
        scored["tasks"][name] = {**entry, "records": recs}
    return summarize_groups(scored, {name: t["records"] for name, t in scored["tasks"].items()})


def with_reference(results: dict, reference: str | None) -> dict:
    """The results plus "forgetting" against a reference results file (when one is given)."""
    if reference:
        ref_path = Path(reference)
        if not ref_path.is_file():
            raise UserError(f"{reference}: reference results file not found")
        try:
            ref = json.loads(ref_path.read_text())
        except json.JSONDecodeError as err:
            raise UserError(f"{reference}: not a results JSON file ({err.msg})") from None
        results["forgetting"] = forgetting(ref, results, str(reference))
    return results


def _with_ci(value: float, ci: list[float]) -> str:
    return f"{value:6.2f} [{ci[0]:5.1f}, {ci[1]:5.1f}]"


def format_table(results: dict) -> str:
    """A plain-text table for the terminal: every score with its n, its 95 % interval and the chance level."""
    lines = [(f"{'task':<24} {'protocol':<13} {'n':>6} {'acc % [95% CI]':>22} {'acc_norm % [95% CI]':>22} "
             f"{'chance':>7} {'major.':>7}")]
    for name, t in results["tasks"].items():
        norm = _with_ci(t["acc_norm"]["value"], t["acc_norm"]["ci95"]) if "acc_norm" in t else "-"
        lines.append(f"{name:<24} {t.get('protocol', '?'):<13} {t['n']:>6} {_with_ci(t['accuracy'], t['ci95']):>22} "
                     f"{norm:>22} {t['chance']:>7.2f} {t['majority']:>7.2f}")
        if t.get("skipped"):
            lines.append(f"  ({t['skipped']} records of {name} do not parse into question and options: not scored)")
    for group, g in results.get("groups", {}).items():
        lines.append(f"{group + ' (pooled)':<38} {g['n']:>6} {_with_ci(g['accuracy'], g['ci95']):>22}"
                     f"   mean of task accuracies {results[group + '_avg']:.2f}")
    fg = results.get("forgetting")
    if fg:
        for group, d in fg["groups"].items():
            lines.append(f"forgetting Δ {group:<9} ω(ref) {d['reference_omega']:.2f} ω {d['omega']:.2f} "
                         f"Δ {d['delta']:+.2f}")
    return "\n".join(lines)
