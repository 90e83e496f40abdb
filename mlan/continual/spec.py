"""The continual recipe: a base mlan recipe, tasks in order, a method and optional rehearsal.

Each task becomes an ordinary mlan recipe (`task_recipe`), validated by `mlan.recipe.parse_recipe` when the
continual recipe is loaded, so a bad source or eval key fails before any build starts.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mlan.errors import MlanError
from mlan.recipe import Recipe, RecipeError, _resolve_paths, apply_override, parse_recipe, read_yaml

Method = Literal["naive", "lora", "soft_targets", "msgm"]
# the paper's Soft Targets α; LoRA's defaults (mlan.recipe.LoraSpec) are its r = hidden/2, rsLoRA, α 8, dropout 0.05
SOFT_TARGETS_ALPHA = 0.01


class ContinualError(MlanError, ValueError):
    """A continual recipe or output folder that cannot run; one line naming the key or the path."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RehearsalSpec(_Strict):
    fraction: float = Field(gt=0, le=1)  # of each earlier VL task's records (the paper: 0.01)
    by: Literal["examples"] = "examples"
    seed: int = 0


class TaskSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    sources: list[dict[str, Any]] = []  # mlan recipe sources; may be empty for the language task (the base LLM)
    budget: dict[str, int] | None = None  # mlan mixture.budget: {tokens: N} or {examples: N}
    eval: list[dict[str, Any]] = Field(min_length=1)  # mlan eval.tasks of this task

    @model_validator(mode="after")
    def _budget_with_sources(self) -> TaskSpec:
        if self.sources and not self.budget:
            raise ValueError(f"task {self.name!r}: sources need a budget ({{tokens: N}} or {{examples: N}})")
        return self


class ContinualSpec(_Strict):
    name: str = "continual"
    method: Method = "naive"
    rehearsal: RehearsalSpec | None = None
    generated_data: Literal["continual-tiny"] | None = None  # generate the data into OUT/data first (`{out}/data/…`)
    # ω of a task with a 0 accuracy: None = the harmonic mean's limit 0; 0.1 = the floor the paper's tables suggest
    zero_floor: float | None = Field(None, gt=0)
    nproc: int = Field(1, ge=1)  # training processes per task
    workers: int | None = Field(None, ge=1)  # build tokenizer actors
    base: dict[str, Any] = {}  # an mlan recipe without sources, mixture.budget or eval.tasks
    tasks: list[TaskSpec] = Field(min_length=2)
    base_dir: str = "."  # the recipe's folder: relative paths resolve against it; `{out}` is the output folder

    @model_validator(mode="after")
    def _unique(self) -> ContinualSpec:
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"task names must be unique; got {names}")
        evals = [e.get("name") for t in self.tasks for e in t.eval]
        if len(set(evals)) != len(evals):
            raise ValueError(f"eval set names must be unique across tasks; got {evals}")
        if not all(t.sources for t in self.tasks[1:]):
            raise ValueError("every vision-language task (tasks 2…) needs sources")
        return self


def _fill_out(node: Any, out: str) -> Any:
    """`{out}` in any string → the output folder (where `generated_data` writes its files)."""
    if isinstance(node, str):
        return node.replace("{out}", out)
    if isinstance(node, list):
        return [_fill_out(v, out) for v in node]
    if isinstance(node, dict):
        return {k: _fill_out(v, out) for k, v in node.items()}
    return node


def load_continual(path: str | Path, overrides: list[str] | tuple[str, ...] = (), out: str | Path | None = None) -> ContinualSpec:
    """Read, override (`--set method=msgm`, `--set tasks.colours.budget.examples=100`), fill `{out}`."""
    path = Path(path)
    if not path.is_file():
        raise ContinualError(f"{path}: continual recipe not found")
    try:
        raw = read_yaml(path) or {}  # bounded aliases; a binary file is one line
    except yaml.YAMLError as err:
        raise ContinualError(f"{path}: not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ContinualError(f"{path}: the top level must be a mapping")
    for assignment in overrides:
        apply_override(raw, assignment)
    if out is not None:
        raw = _fill_out(raw, str(Path(out).resolve()))
    raw["base_dir"] = str(path.parent.resolve())
    try:
        spec = ContinualSpec.model_validate(raw)
    except ValidationError as err:
        e = err.errors()[0]
        where = ".".join(str(p) for p in e["loc"]) or "<root>"
        raise ContinualError(f"{path}: invalid continual recipe: {where}: {e['msg'].removeprefix('Value error, ')}") from None
    return spec


def method_train(method: Method, train: dict[str, Any]) -> dict[str, Any]:
    """The `train:` section of a vision-language task under `method` (the language task trains as written)."""
    train = copy.deepcopy(train)
    if method in ("lora", "msgm"):
        train["lora"] = {**train.get("lora", {}), "enabled": True}
    if method in ("soft_targets", "msgm"):
        train["soft_targets"] = train.get("soft_targets") or SOFT_TARGETS_ALPHA
    return train


def task_raw(spec: ContinualSpec, k: int, start: str | None, sources: list[dict[str, Any]] | None = None,
             budget: dict[str, int] | None = None) -> dict[str, Any]:
    """Task k (0-based) as a raw mlan recipe: its sources (default: the task's), budget, the evals so far, the method.

    `start` is the previous task's export (None: the base recipe's model as written).
    """
    task = spec.tasks[k]
    raw = copy.deepcopy(spec.base)
    for key in ("sources",):
        if key in raw:
            raise ContinualError(f"base.{key}: sources belong to the tasks, not the base recipe")
    model = dict(raw.get("model") or {})
    if start is not None:
        model = {key: v for key, v in model.items() if key not in ("llm", "vision_tower")}
        model["config"] = start
    raw["model"] = model
    raw["sources"] = copy.deepcopy(task.sources if sources is None else sources)
    mixture = dict(raw.get("mixture") or {})
    chosen = budget or task.budget or {"examples": 1}
    unit = next(iter(chosen))
    mixture["budget"] = dict(chosen)
    mixture["ratio"] = {"text": 1.0 if k == 0 else 0.0, "by": unit}
    raw["mixture"] = mixture
    if k > 0:
        raw["train"] = method_train(spec.method, raw.get("train") or {})
    evals = []
    for j, t in enumerate(spec.tasks[: k + 1]):
        for e in t.eval:
            evals.append({"group": "language" if j == 0 else "vision", **e})
    raw["eval"] = {**(raw.get("eval") or {}), "tasks": evals}
    # absolute paths: the task's recipe file is written into its own folder, not beside the continual recipe
    return _resolve_paths(raw, Path(spec.base_dir))


def parse_task(spec: ContinualSpec, raw: dict[str, Any], k: int) -> Recipe:
    """Validate one task's recipe; the error names the task."""
    try:
        recipe = parse_recipe(copy.deepcopy(raw), spec.base_dir, f"task {k + 1} ({spec.tasks[k].name})")
    except RecipeError as err:
        raise ContinualError(str(err)) from None
    want = "text" if k == 0 else "image_text"
    n_own = len(spec.tasks[k].sources)
    wrong = [s.name for s in recipe.sources[:n_own] if s.modality != want]
    if wrong:
        kind = "the language task" if k == 0 else "a vision-language task"
        raise ContinualError(f"task {k + 1} ({spec.tasks[k].name}): sources {wrong} are not modality {want!r}, "
                             f"as every source of {kind} must be")
    return recipe


def check_tasks(spec: ContinualSpec) -> list[Recipe]:
    """Every task's recipe (without rehearsal), validated before any work."""
    return [parse_task(spec, task_raw(spec, k, None if k == 0 else "tiny"), k) for k in range(len(spec.tasks))]
