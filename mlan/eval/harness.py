"""`mlan eval`: zero-shot scoring of a causal LM, LLaVA or Mllama model directory on benchmark files.

This module loads the model, gives the scorers (mlan.eval.scoring) a batch's image inputs, and runs the
tasks into a results dict with group averages and forgetting. Prompts are rendered as the build renders
them (mlan.eval.prompts); answers are extracted in mlan.eval.answers. Accuracies are percentages.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from mlan.errors import UserError
from mlan.eval.forgetting import forgetting
from mlan.eval.scoring import ModelInputs, score_choice, score_generate
from mlan.eval.tasks import Task, load_task, parse_task_arg
from mlan.families.base import EvalGeometry
from mlan.families.registry import family_for_model_type, family_plugin
from mlan.pretrained import resolve_model_path
from mlan.weights import check_model_dir, load_checked


# ---------------------------------------------------------------- model and inputs
@dataclass
class Loaded:
    """A model with what its prompts and images need."""

    model: torch.nn.Module
    tokenizer: Any
    family: str | None  # a registered family name; None for a text-only causal LM
    image_token_id: int | None
    image_tokens: int  # in-sequence positions per image
    image_size: int
    max_tiles: int
    stop_ids: list[int]


def load_model(path: str) -> Loaded:
    """A model folder (save_pretrained) or hub id → model in eval mode + tokenizer; UserError names the path."""
    path = resolve_model_path(path)  # a named offline base (e.g. smollm2-135m-instruct) → its converted folder
    p = Path(path)
    if p.exists() and not (p / "config.json").is_file():
        raise UserError(f"{path}: not a model directory (no config.json)")
    check_model_dir(path)  # safetensors only, headers sound: never unpickle, never trust a length field
    try:
        cfg = AutoConfig.from_pretrained(path)
    except Exception as err:  # noqa: BLE001 - transformers raises many types for a bad folder/id
        raise UserError(f"{path}: not a model directory or hub id ({type(err).__name__}: {str(err).splitlines()[0]})") from None
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as err:  # noqa: BLE001
        raise UserError(f"{path}: the model has no usable tokenizer ({type(err).__name__}: {str(err).splitlines()[0]})") from None
    plugin = family_for_model_type(cfg.model_type)
    if plugin is not None:
        model, geo = plugin.runtime().eval_model(path, cfg)
        loaded = Loaded(model, tok, plugin.name, geo.image_token_id, geo.image_tokens, geo.image_size, geo.max_tiles, [])
    else:
        try:
            model = load_checked(AutoModelForCausalLM.from_pretrained, path)  # damaged weights: one line
        except Exception as err:  # noqa: BLE001
            raise UserError(f"{path}: not a causal LM ({type(err).__name__}: {str(err).splitlines()[0]})") from None
        loaded = Loaded(model, tok, None, None, 0, 0, 1, [])
    model.eval()
    stops = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    for t in ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"):
        i = tok.convert_tokens_to_ids(t)
        if isinstance(i, int) and i != tok.unk_token_id and tok.convert_ids_to_tokens(i) == t:
            stops.add(i)
    loaded.stop_ids = sorted(s for s in stops if s is not None)
    return loaded


def _open_image(path: str):
    with Image.open(path) as im:
        return im.convert("RGB")


def _forward_kwargs(lm: Loaded, ids: torch.Tensor, images: list[str] | None) -> dict[str, torch.Tensor]:
    """The family's image inputs for one image per sequence (same preprocessing as mlan's training loader)."""
    if not images:
        return {}
    geometry = EvalGeometry(lm.image_token_id, lm.image_tokens, lm.image_size, lm.max_tiles)
    return family_plugin(lm.family).runtime().eval_inputs(ids, [_open_image(p) for p in images], geometry)


def model_inputs(lm: Loaded) -> ModelInputs:
    """What the scorers call for a batch's image inputs."""
    return partial(_forward_kwargs, lm)


# ---------------------------------------------------------------- the run
def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def evaluate_tasks(lm: Loaded, tasks: list[Task], batch_size: int = 8, max_new_tokens: int = 64,
                   keep_records: bool = False) -> dict:
    """Score loaded tasks; returns the results dict (see `evaluate`)."""
    results: dict[str, Any] = {"tasks": {}}
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=None, transient=not sys.stderr.isatty(), disable=not sys.stderr.isatty()) as bar:
        for task in tasks:
            if task.group == "vision" and lm.family is None:
                raise UserError(f"{task.path}: image task, but the model is a text-only causal LM")
            tid = bar.add_task(f"eval {task.name}", total=len(task.items))
            step = lambda n, tid=tid: bar.advance(tid, n)
            if task.kind == "choice":
                acc, records = score_choice(lm, task, batch_size, step, model_inputs(lm))
            else:
                acc, records = score_generate(lm, task, batch_size, max_new_tokens, step, model_inputs(lm))
            entry = {"accuracy": acc, "n": len(task.items), "group": task.group, "kind": task.kind,
                     "format": task.format, "path": task.path}
            if keep_records:
                entry["records"] = records
            results["tasks"][task.name] = entry
    for group in ("language", "vision"):
        accs = [t["accuracy"] for t in results["tasks"].values() if t["group"] == group]
        results[f"{group}_avg"] = _mean(accs)
    return results


def _as_task(spec: Any, limit: int | None, images: str | None, image_pattern: str | None = None) -> Task:
    if isinstance(spec, Task):
        return spec
    if isinstance(spec, (str, Path)):
        name, path = parse_task_arg(str(spec))
        return load_task(path, name, images=images, limit=limit, image_pattern=image_pattern)
    # an EvalTaskSpec (recipe) or a dict with its keys
    get = (lambda k: getattr(spec, k, None)) if not isinstance(spec, dict) else spec.get
    return load_task(get("path"), get("name"), kind=get("kind"), format=get("format"), group=get("group"),
                     images=get("images") or images, limit=limit if limit is not None else get("limit"),
                     image_pattern=get("image_pattern") or image_pattern)


def evaluate(model_path: str, tasks: list, batch_size: int = 8, limit: int | None = None,
             max_new_tokens: int = 64, images: str | None = None, reference: str | None = None,
             keep_records: bool = False, image_pattern: str | None = None) -> dict:
    """Evaluate a model directory on task files / NAME=PATH strings / recipe task specs.

    Returns {"model", "tasks": {name: {accuracy (%), n, group, kind, format, path}}, "language_avg",
    "vision_avg"} plus "forgetting" ({omega, reference_omega, delta} per group) when `reference` is a results file.
    """
    loaded_tasks = [_as_task(t, limit, images, image_pattern) for t in tasks]  # check every file before loading the model
    names = [t.name for t in loaded_tasks]
    if len(set(names)) != len(names):
        raise UserError(f"task names must be unique; got {names} (use NAME=PATH)")
    lm = load_model(str(model_path))
    results = {"model": str(model_path), **evaluate_tasks(lm, loaded_tasks, batch_size, max_new_tokens, keep_records)}
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


def format_table(results: dict) -> str:
    """A small plain-text table of the results for the terminal."""
    lines = [f"{'task':<28} {'group':<9} {'kind':<9} {'n':>6} {'acc %':>7}"]
    for name, t in results["tasks"].items():
        lines.append(f"{name:<28} {t['group']:<9} {t['kind']:<9} {t['n']:>6} {t['accuracy']:>7.2f}")
    for group in ("language", "vision"):
        if results.get(f"{group}_avg") is not None:
            lines.append(f"{group + '_avg':<55} {results[group + '_avg']:>7.2f}")
    fg = results.get("forgetting")
    if fg:
        for group, d in fg["groups"].items():
            lines.append(f"forgetting Δ {group:<9} ω(ref) {d['reference_omega']:.2f} ω {d['omega']:.2f} "
                         f"Δ {d['delta']:+.2f}")
    return "\n".join(lines)
