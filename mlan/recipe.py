"""The recipe: every knob of a build, a training run and an evaluation, with its default and its check.

Recipes are YAML; key paths are part of the interface (`--set mixture.budget.tokens=200000`).
Unknown keys are errors. Relative paths resolve against the recipe file's folder.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from mlan.errors import MlanError
from mlan.families.registry import family_names


class RecipeError(MlanError, ValueError):
    """An invalid recipe: one line naming the key path, the bad value and what is allowed."""


class _Strict(BaseModel):
    # allow_inf_nan=False: `weight: inf` or `.nan` is refused here, not deep in the planner (#22)
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=(), allow_inf_nan=False)


# YAML aliases a recipe may expand to: an alias bomb (nine levels of nine aliases) composes in
# microseconds but expands to 10^9 nodes in whatever walks it next (validation, paths, dumps)
MAX_YAML_NODES = 100_000


def _expanded_nodes(node: yaml.Node, memo: dict[int, int]) -> int:
    """How many nodes `node` stands for once every alias is expanded (memoized: linear in the document)."""
    known = memo.get(id(node))
    if known is not None:
        return known
    memo[id(node)] = 1  # a recursive alias (`&a [*a]`) counts once instead of looping
    if isinstance(node, yaml.SequenceNode):
        total = 1 + sum(_expanded_nodes(child, memo) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        total = 1 + sum(_expanded_nodes(k, memo) + _expanded_nodes(v, memo) for k, v in node.value)
    else:
        total = 1
    memo[id(node)] = total
    return total


def parse_yaml(text: str, where: str) -> Any:
    """Safe YAML → Python, refusing a document whose aliases expand past MAX_YAML_NODES (one line)."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        expanded = _expanded_nodes(node, {})
        if expanded > MAX_YAML_NODES:
            raise RecipeError(f"{where}: YAML aliases expand to {expanded:,} nodes, more than {MAX_YAML_NODES:,} "
                              "(an alias bomb?); write the values out or use fewer aliases")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def read_yaml(path: Path) -> Any:
    """A recipe file's YAML: text (a binary file is one line, not a UnicodeDecodeError) with bounded aliases."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RecipeError(f"{path}: not a text file (byte {err.start} is not UTF-8); a recipe is YAML text") from None
    try:
        return parse_yaml(text, str(path))
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML: {str(err).splitlines()[0]}") from None


# ---------------------------------------------------------------- model
class ModelSpec(_Strict):
    family: str = "llava"  # a registered family (`mlan.families.family_names()`)
    tokenizer: str = "llama3"
    template: Literal["llama3", "vicuna_v1", "tokenizer"] | None = None  # None: the family's default
    config: str = "tiny"  # a Hugging Face path / hub id, or `tiny`
    # LLaVA-style composition from parts (used when config is not a full VLM checkpoint)
    llm: str | None = None
    vision_tower: str | None = None
    image_tokens: int = Field(576, ge=1)  # llava: placeholders per image
    image_size: int | None = Field(None, ge=8)  # llava: vision input side; mllama: tile side (560 real)
    max_tiles: int = Field(4, ge=1, le=16)  # mllama

    @field_validator("family")
    @classmethod
    def _registered_family(cls, family: str) -> str:
        """Only registered families; the error reads as pydantic's own for a fixed choice (names them all)."""
        if family not in family_names():
            expected = " or ".join(repr(name) for name in family_names())
            raise PydanticCustomError("literal_error", "Input should be {expected}", {"expected": expected})
        return family

    @model_validator(mode="before")
    @classmethod
    def _compose_from_parts(cls, data: Any) -> Any:
        """`llm` + `vision_tower` mean "compose LLaVA from parts": config reads `compose`, never `tiny`."""
        if isinstance(data, dict) and (data.get("llm") or data.get("vision_tower")):
            if data.get("config") in (None, "tiny", "compose"):
                data = {**data, "config": "compose"}
            else:
                raise ValueError("give either config (a full checkpoint) or llm + vision_tower (compose), not both")
        return data


# ---------------------------------------------------------------- sources
class TemplateSpec(_Strict):
    """Prompt/response templates over a record's fields (MLAN's paraphrased-template rendering)."""

    prompts: list[str] = Field(min_length=1)  # one chosen per record by a seeded hash of the record
    response: str
    system: str | None = None
    image: str | None = None  # image path template, e.g. images/{directory}/dev-{identifier}-0.png
    engine: Literal["format", "jinja"] = "format"
    seed: int = Field(0, ge=0)


class SourceSpec(_Strict):
    name: str = Field(min_length=1)
    path: str  # local file/folder, fsspec URL, saved dataset folder, or a Hugging Face datasets id
    format: Literal["alpaca", "sharegpt", "llava", "messages", "prompt_completion", "template", "oasst"]
    modality: Literal["text", "image_text"]
    weight: float = Field(1.0, gt=0)
    images: str | None = None  # image root; relative image paths resolve under it and never outside
    # rewrite each record's image path before resolving: a format string over {path, name, stem, parent},
    # e.g. "{name}" when a dataset's JSON names a folder that was renamed on disk
    image_path: str | None = None
    split: str = "train"  # Hugging Face datasets split
    subset: str | None = None  # Hugging Face datasets config name
    limit: int | None = Field(None, ge=1)
    template: TemplateSpec | None = None
    upsample: bool | None = None  # overrides mixture.upsample for this source
    tree_paths: Literal["best", "all"] = "best"  # format oasst: the best-ranked path, or every root-to-leaf path
    # format prompt_completion: a completion ending in one of these has it stripped (GPT-3-style files)
    end_markers: list[str] = Field(default_factory=lambda: ["<|endoftext|>", "</s>"])

    @model_validator(mode="after")
    def _template_needs_spec(self) -> SourceSpec:
        if self.format == "template" and self.template is None:
            raise ValueError("format 'template' needs a `template:` block (prompts, response)")
        return self


# ---------------------------------------------------------------- mixture / shards
class BudgetSpec(_Strict):
    tokens: int | None = Field(None, ge=1)
    examples: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _exactly_one(self) -> BudgetSpec:
        if (self.tokens is None) == (self.examples is None):
            raise ValueError("give exactly one of budget.tokens or budget.examples")
        return self


class RatioSpec(_Strict):
    text: float = Field(0.75, ge=0.0, le=1.0)
    by: Literal["tokens", "examples"] = "tokens"


PACK_BUFFER_ROWS = 64  # the same as mlan.mixture.pack.MIN_BUFFER_ROWS (this module stays numpy-free)


class MixtureSpec(_Strict):
    budget: BudgetSpec = BudgetSpec(tokens=2_000_000)
    ratio: RatioSpec = RatioSpec()
    seq_len: int = Field(4096, ge=16)
    max_images_per_row: int = Field(8, ge=1)
    seed: int = Field(42, ge=0)  # numpy seeds are non-negative
    upsample: bool = True
    overlong: Literal["truncate", "drop"] = "truncate"  # documents longer than seq_len
    pack_buffer_tokens: int | None = Field(None, ge=1)  # None: pack the whole plan at once
    # images refused from their header before any decode (docs/build.md): the defaults admit every real photo
    max_image_pixels: int = Field(120_000_000, ge=1)
    max_image_aspect: float = Field(20.0, ge=1.0)
    # a conversation with more text than this (UTF-8 bytes) is rejected before it is tokenized (docs/sources.md)
    max_record_bytes: int = Field(1 << 20, ge=1)
    # the most times a budget may repeat a source's documents (docs/build.md): checked before the plan is made
    max_upsample: float = Field(1000.0, ge=1.0)

    @model_validator(mode="after")
    def _pack_buffer_holds_rows(self) -> MixtureSpec:
        """The packer needs a buffer of at least PACK_BUFFER_ROWS rows (mlan.mixture.pack.MIN_BUFFER_ROWS)."""
        if self.pack_buffer_tokens is not None and self.pack_buffer_tokens < PACK_BUFFER_ROWS * self.seq_len:
            raise ValueError(f"mixture.pack_buffer_tokens = {self.pack_buffer_tokens} is under {PACK_BUFFER_ROWS} "
                             f"× seq_len = {PACK_BUFFER_ROWS * self.seq_len}")
        return self


class ShardSpec(_Strict):
    target_tokens: int = Field(50_000_000, ge=1)
    pre_resize: bool = False  # store images resized to the family's resolution


# ---------------------------------------------------------------- train
class FreezeSpec(_Strict):
    vision_tower: bool = True
    projector: bool = False
    language_model: bool = False
    cross_attention: bool = False


class LoraSpec(_Strict):
    enabled: bool = False
    rank: int | None = Field(None, ge=1)  # None: hidden/2
    alpha: float = 8.0
    dropout: float = Field(0.05, ge=0, lt=1)
    rslora: bool = True


class TrainSpec(_Strict):
    stage: Literal["stage1", "stage2", "custom"] = "stage2"
    lr: float | None = Field(None, gt=0)  # None: the stage's default (stage1 1e-3, stage2 2e-5)
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = Field(1.0, gt=0)
    batch_rows: int = Field(1, ge=1)  # packed rows per rank per micro-batch
    grad_accum: int = Field(1, ge=1)
    budget_tokens: int | None = Field(None, ge=1)  # None: the build's total sequence tokens
    checkpoint_every_tokens: int | None = Field(None, ge=1)
    soft_targets: float | None = Field(None, ge=0, lt=1)  # α; 0.01 is the paper's value
    lora: LoraSpec = LoraSpec()
    freeze: FreezeSpec | None = None  # None: the stage's preset
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    activation_checkpointing: bool = False
    compile: bool = False
    # language-model self-attention: documents = per-document SDPA on packed rows (mlan.train.attention)
    attention: Literal["documents", "sdpa"] = "documents"
    seed: int = 42
    loader_workers: int = Field(1, ge=0)
    log_every: int = Field(1, ge=1)
    tensorboard: bool = False  # the same as listing "tensorboard" in trackers
    # experiment trackers beside metrics.jsonl, all offline under the run folder (mlan.train.trackers)
    trackers: list[Literal["tensorboard", "mlflow", "wandb"]] = []
    peak_flops: float | None = Field(None, gt=0)  # accelerator peak FLOP/s for MFU; None: the known-GPU table


# ---------------------------------------------------------------- eval
class EvalTaskSpec(_Strict):
    name: str
    path: str
    # choice: log-likelihood of each option; generate: greedy generation + answer extraction. None: by format
    kind: Literal["choice", "generate"] | None = None
    format: str | None = None  # None: inferred from the file
    group: Literal["language", "vision"] | None = None
    images: str | None = None
    image_pattern: str | None = None  # image path over record fields + {split}; see mlan.eval.tasks
    limit: int | None = Field(None, ge=1)
    # the training source (a `template` source of this recipe) whose rendering is each item's prompt
    source: str | None = None
    _source_spec: SourceSpec | None = PrivateAttr(None)  # set by Recipe's check of `source`

    @property
    def source_spec(self) -> SourceSpec | None:
        """The named training source, resolved by the recipe; a name nobody resolved is an error, not a silent
        fallback to the format's own prompt."""
        if self.source is not None and self._source_spec is None:
            raise RecipeError(f"eval task {self.name!r}: source {self.source!r} is resolved only inside a recipe "
                              "(its sources)")
        return self._source_spec


class EvalSpec(_Strict):
    tasks: list[EvalTaskSpec] = []
    batch_size: int = Field(8, ge=1)
    max_new_tokens: int = Field(64, ge=1)
    limit: int | None = Field(None, ge=1)
    reference: str | None = None  # results file of the reference model, for forgetting Δ


# ---------------------------------------------------------------- recipe
class Recipe(_Strict):
    model: ModelSpec = ModelSpec()
    sources: list[SourceSpec] = []
    mixture: MixtureSpec = MixtureSpec()
    shards: ShardSpec = ShardSpec()
    train: TrainSpec = TrainSpec()
    eval: EvalSpec = EvalSpec()
    base_dir: str = "."  # the recipe file's folder (set by load_recipe; relative paths were resolved against it)

    @field_validator("sources")
    @classmethod
    def _unique_names(cls, sources: list[SourceSpec]) -> list[SourceSpec]:
        names = [s.name for s in sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"source names must be unique; repeated: {', '.join(dupes)}")
        return sources

    @model_validator(mode="after")
    def _eval_sources(self) -> Recipe:
        """An eval task's `source` names a `template` source of this recipe; the task keeps its spec."""
        by_name = {s.name: s for s in self.sources}
        for i, task in enumerate(self.eval.tasks):
            if task.source is None:
                continue
            spec = by_name.get(task.source)
            where = f"eval.tasks.{i}.source = {task.source!r}"
            if spec is None:  # values go in the context: a brace in a name is no placeholder
                raise PydanticCustomError("recipe_key", "{where}: no source of that name (sources: {known})",
                                          {"where": where, "known": ", ".join(by_name) or "none"})
            if spec.format != "template":
                raise PydanticCustomError("recipe_key", "{where}: source has format {format}; an eval task's "
                                          "prompt comes only from a `template` source",
                                          {"where": where, "format": repr(spec.format)})
            task._source_spec = spec
        return self

    def source(self, name: str) -> SourceSpec:
        for s in self.sources:
            if s.name == name:
                return s
        raise RecipeError(f"sources: no source named {name!r}; known: {', '.join(s.name for s in self.sources)}")

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


# ---------------------------------------------------------------- loading
_LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet", ".arrow", ".yaml", ".yml", ".model", ".safetensors", ".txt")


def _looks_local(value: str, base: Path) -> bool:
    """Local unless it reads as a URL or a hub id (`org/name`, no file suffix, not present here)."""
    if "://" in value:
        return False
    if value.startswith(("./", "../", "/", "~")) or value.lower().endswith(_LOCAL_SUFFIXES):
        return True
    return (base / value).exists()


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(value: str) -> str:
    """`${NAME}` and `${NAME:-default}` from the environment, so shipped recipes can point at data that lives
    elsewhere (`${MLAN_SHARED_DATA:-../../shared/data}`) without editing them."""
    def replace(match: re.Match) -> str:
        name, default = match.group(1), match.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is None:
            raise RecipeError(f"{value!r}: environment variable {name} is not set (and no ${{{name}:-default}})")
        return default

    return _ENV_REF.sub(replace, value)


def _resolve(value: str | None, base: Path, always_local: bool = False) -> str | None:
    if value is not None and "\0" in value:  # no file system has such a name; os.path raises ValueError
        raise RecipeError(f"path {value!r} contains a NUL character")
    if value is not None:
        value = expand_env(value)
    if value is None or "://" in value or not (always_local or _looks_local(value, base)):
        return value
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def _resolve_paths(raw: dict, base: Path) -> dict:
    """Resolve relative local paths against the recipe folder; hub ids and URLs stay as written."""
    model = raw.get("model")
    if isinstance(model, dict):
        for key in ("tokenizer", "config", "llm", "vision_tower"):
            if isinstance(model.get(key), str) and model[key] not in ("llama3", "tiny"):
                model[key] = _resolve(model[key], base)
    sources = raw.get("sources")
    for src in sources if isinstance(sources, list) else []:  # another type is pydantic's to report
        if isinstance(src, dict):
            if isinstance(src.get("path"), str):
                src["path"] = _resolve(src["path"], base)
            if isinstance(src.get("images"), str):  # an image root is a folder, never a hub id
                src["images"] = _resolve(src["images"], base, always_local=True)
    ev = raw.get("eval")
    if isinstance(ev, dict):
        if isinstance(ev.get("reference"), str):
            ev["reference"] = _resolve(ev["reference"], base)
        tasks = ev.get("tasks")
        for task in tasks if isinstance(tasks, list) else []:
            if isinstance(task, dict):
                for key in ("path", "images"):
                    if isinstance(task.get(key), str):
                        task[key] = _resolve(task[key], base, always_local=True)
    return raw


def apply_override(raw: dict, assignment: str) -> None:
    """Apply one `dotted.key=value` (value parsed as YAML). List items by index or by `name`."""
    if "=" not in assignment:
        raise RecipeError(f"--set {assignment!r}: expected dotted.key=value")
    dotted, _, text = assignment.partition("=")
    try:
        value = parse_yaml(text, f"--set {assignment}") if text != "" else ""
    except yaml.YAMLError as err:
        raise RecipeError(f"--set {assignment}: not a YAML value: {' '.join(str(err).split())}") from None
    keys = dotted.strip().split(".")
    node: Any = raw
    for i, key in enumerate(keys):
        last = i == len(keys) - 1
        if isinstance(node, list):
            if key.isdigit() and int(key) < len(node):
                idx = int(key)
            else:
                idx = next((j for j, item in enumerate(node) if isinstance(item, dict) and item.get("name") == key), None)
                if idx is None:
                    raise RecipeError(f"--set {dotted}: no list item {key!r} at {'.'.join(keys[:i]) or '<root>'}")
            if last:
                node[idx] = value
            else:
                node = node[idx]
        elif isinstance(node, dict):
            if last:
                node[key] = value
            else:
                if node.get(key) is None:
                    node[key] = {}
                node = node[key]
        else:
            raise RecipeError(f"--set {dotted}: {'.'.join(keys[:i])} is a value, not a section")


def _format_error(err: ValidationError, source: str) -> str:
    parts = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "<root>"
        bad = e.get("input")
        if e["type"] == "extra_forbidden":
            parts.append(f"{path}: unknown key (value {bad!r})")
            continue
        if e["type"] == "recipe_key":  # a check across sections: the message names its own key path
            parts.append(e["msg"])
            continue
        msg = e["msg"].removeprefix("Value error, ")
        allowed = ""
        ctx = e.get("ctx") or {}
        if "expected" in ctx:
            allowed = f"; allowed: {ctx['expected']}"
        shown = bad if not isinstance(bad, dict | list) else type(bad).__name__
        parts.append(f"{path} = {shown!r}: {msg}{allowed}")
    return f"{source}: invalid recipe: " + "; ".join(parts)


def parse_recipe(raw: dict, base_dir: str | Path = ".", source: str = "<recipe>") -> Recipe:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{source}: invalid recipe: the top level must be a mapping, got {type(raw).__name__}")
    base = Path(base_dir).resolve()
    try:
        raw = _resolve_paths(dict(raw), base)
    except RecipeError as err:
        raise RecipeError(f"{source}: invalid recipe: {err}") from None
    raw["base_dir"] = str(base)
    try:
        return Recipe.model_validate(raw)
    except ValidationError as err:
        raise RecipeError(_format_error(err, source)) from None


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    raw = read_yaml(path) or {}
    for assignment in overrides:
        apply_override(raw, assignment)
    return parse_recipe(raw, path.parent, str(path))
