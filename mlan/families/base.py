"""The model-family plug-in contract: what one family folder under `mlan/families/` provides.

A family has a torch-free side (`FamilyPlugin`: name, geometry from a recipe's `model:` section, the render-side
`Family` with its token accounting, the checks on a manifest's `family_config`) and a torch side
(`FamilyRuntime`: model build/load, processor, the image inputs of a batch, the same-modules hook, the eval
inputs) that `FamilyPlugin.runtime()` imports on first use, so rendering and recipe parsing never load torch.
"""
from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from functools import cached_property
from typing import Any, ClassVar, Protocol

from mlan.errors import MlanError

IMAGE_TOKEN_CANDIDATES = ("<|image|>", "<image>")  # Llama-3.2-Vision / mlan's llama3, then LLaVA's


class ModelBuildError(MlanError, ValueError):
    """The model section cannot produce a model (names the key and the reason)."""


@dataclass(frozen=True)
class VisionGeometry:
    """Image-side sizes a family needs for token accounting (resolved from the recipe and the model config)."""

    image_size: int  # llava: vision input side; mllama: tile side
    patch_size: int
    image_tokens: int  # llava: in-sequence placeholders per image; mllama: 1
    max_tiles: int  # mllama; 1 for llava
    vocab_size: int | None = None  # the LM's output rows, when the model config says so


class GeometryError(MlanError, ValueError):
    """A manifest's `family_config` key of the wrong type (one line naming `family_config.<key>`)."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class ModelGeometry:
    """The model geometry a build was rendered for, typed: render writes it into the manifest (`family_config`),
    collate, train and eval read it back (eval from a checkpoint's config) and must agree with it.

    The field order is the manifest's key order (`to_manifest`), so the manifest's JSON is unchanged.
    """

    family: str  # a registered family name
    vocab_size: int  # rows of the LM's output layer
    image_token_id: int | None = None  # None: a tokenizer without an image token (a text-only build)
    image_tokens: int = 1  # in-sequence positions per image (llava: N placeholders, mllama: 1)
    image_size: int | None = None  # llava: vision input side; mllama: tile side
    patch_size: int | None = None
    tile_size: int | None = None  # mllama: tile side (560 for the real model); None for families that do not tile
    max_tiles: int = 4  # mllama; 1 for llava

    # manifest key → (what a value must be, the check); None is always allowed where the field has a default
    _CHECKS: ClassVar[dict[str, tuple[str, Any]]] = {
        "family": ("a family name (a string)", lambda v: isinstance(v, str)),
        "vocab_size": ("a positive integer", lambda v: _is_int(v) and v > 0),
        "image_token_id": ("a token id (a non-negative integer)", lambda v: _is_int(v) and v >= 0),
        "image_tokens": ("a positive integer", lambda v: _is_int(v) and v > 0),
        "image_size": ("a positive integer", lambda v: _is_int(v) and v > 0),
        "patch_size": ("a positive integer", lambda v: _is_int(v) and v > 0),
        "tile_size": ("a positive integer", lambda v: _is_int(v) and v > 0),
        "max_tiles": ("a positive integer", lambda v: _is_int(v) and v > 0),
    }

    def to_manifest(self) -> dict[str, Any]:
        """The manifest's `family_config` object (every key, in field order)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_manifest(cls, data: Any) -> ModelGeometry:
        """A manifest's `family_config` → the geometry; a missing `family`/`vocab_size` or a value of the wrong
        type is a GeometryError naming `family_config.<key>`. Unknown keys are ignored; a missing or null
        optional key takes its default."""
        if not isinstance(data, Mapping):
            raise GeometryError(f"family_config is a {type(data).__name__}, not an object")
        values: dict[str, Any] = {}
        for key, (what, ok) in cls._CHECKS.items():
            value = data.get(key)
            if value is None:
                if key in ("family", "vocab_size"):
                    raise GeometryError(f"family_config.{key}: missing")
                continue
            if not ok(value):
                raise GeometryError(f"family_config.{key}: {str(value)[:80]!r} is not {what}")
            values[key] = value
        return cls(**values)


class ModelSection(Protocol):
    """What a family reads from a recipe's `model:` section (`mlan.recipe.ModelSpec` is one). The contract names
    it rather than importing the recipe: the recipe sits above the registry, validating `model.family` there."""

    family: str
    tokenizer: str
    template: str | None
    config: str
    llm: str | None
    vision_tower: str | None
    image_tokens: int
    image_size: int | None
    max_tiles: int


class Family(ABC):
    """One model family for one recipe's `model:` section, render side; built by `mlan.families.get_family`."""

    name: str
    default_template: str = "llama3"

    def __init__(self, model: ModelSection, geometry: VisionGeometry):
        self.model = model
        self.geometry = geometry
        self._tokenizer: Any = None

    @property
    def tokenizer(self) -> Any:
        """`model.tokenizer`, loaded on first use (or the one a caller set)."""
        if self._tokenizer is None:
            # lazy: mlan.tokenizer loads transformers (~0.7 s after `import mlan.mixture.verify`); recipe parsing
            # imports this module in `mlan verify`, `study` and `ablate`, which never load a tokenizer
            from mlan.tokenizer import load_tokenizer

            self._tokenizer = load_tokenizer(self.model.tokenizer)
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, tokenizer: Any) -> None:
        """Use an already loaded tokenizer (a caller's) instead of loading `model.tokenizer`."""
        self._tokenizer = tokenizer

    @property
    def template(self) -> str:
        """`model.template`, else the tokenizer's default (mlan.templates.default_template)."""
        from mlan.templates import default_template  # lazy: as the tokenizer above

        return self.model.template or default_template(self.tokenizer, self.default_template)

    @cached_property
    def image_token(self) -> str | None:
        """The image token's string in this tokenizer (`<|image|>` or `<image>`), None when it has neither."""
        vocab = self.tokenizer.get_vocab()
        return next((t for t in IMAGE_TOKEN_CANDIDATES if t in vocab), None)

    @property
    def image_token_id(self) -> int:
        if self.image_token is None:
            raise ValueError(
                f"tokenizer {self.model.tokenizer!r} has no image token (looked for {', '.join(IMAGE_TOKEN_CANDIDATES)}); "
                "add one to the tokenizer before rendering images"
            )
        return int(self.tokenizer.convert_tokens_to_ids(self.image_token))

    @abstractmethod
    def image_seq_tokens(self) -> int:
        """In-sequence positions one image occupies (counted as sequence tokens, never as loss tokens)."""

    @abstractmethod
    def tiles_for(self, width: int, height: int) -> int:
        """Tiles the vision encoder sees for an image of this size (llava: 1)."""

    @abstractmethod
    def vision_tokens_for(self, width: int, height: int) -> int:
        """Encoder-side positions for an image of this size (reported, never budgeted)."""

    @abstractmethod
    def vocab_size(self) -> int:
        """Rows of the LM's output layer."""

    @abstractmethod
    def stored_image_size(self, width: int, height: int) -> tuple[int, int]:
        """The (width, height) an image is stored at with `pre_resize`: the family's input resolution."""

    def tile_size(self) -> int | None:
        """The side of one vision tile, for families that tile images (None otherwise)."""
        return None

    def model_geometry(self) -> ModelGeometry:
        """The geometry this family renders for: what a trainer needs to check shards against its model."""
        g = self.geometry
        return ModelGeometry(
            family=self.name,
            vocab_size=self.vocab_size(),
            image_token_id=self.image_token_id if self.image_token is not None else None,
            image_tokens=self.image_seq_tokens(),
            image_size=g.image_size,
            patch_size=g.patch_size,
            tile_size=self.tile_size(),
            max_tiles=g.max_tiles,
        )

    def family_config(self) -> dict:
        """The manifest's `family_config` (`model_geometry().to_manifest()`)."""
        return self.model_geometry().to_manifest()


class FamilyRuntime(ABC):
    """The torch side of a family: models, processors and batch inputs, from a manifest's `family_config`."""

    @abstractmethod
    def build_tiny(self, family_config: Mapping[str, Any]) -> Any:
        """A tiny model of the real architecture at the build's image geometry (random weights, fp32)."""

    @abstractmethod
    def load_pretrained(self, path_or_id: str) -> Any:
        """A full checkpoint of this family (already checked to be one), fp32 on CPU."""

    def compose(self, model_spec: ModelSection, family_config: Mapping[str, Any]) -> Any:
        """A model composed from a base LLM and a vision tower (`model.llm` + `model.vision_tower`)."""
        raise NotImplementedError  # only families with `composes_from_parts` are asked

    def prepare(self, model: Any) -> Any:
        """Whatever every built or loaded model of the family needs before use (default: nothing)."""
        return model

    @abstractmethod
    def processor(self, family_config: Mapping[str, Any], tokenizer: Any) -> Any:
        """The HF processor saved next to an exported model, matching the training images."""

    @abstractmethod
    def batch_images(self, family_config: Any, rows: Sequence[Any], decoded: list[list[Any]], length: int,
                     always_images: bool) -> dict[str, Any]:
        """The image inputs of a collated batch (pixel values and whatever masks the model takes)."""

    def same_modules_inputs(self, batch: dict[str, Any], family_config: Mapping[str, Any]) -> Any:
        """Make a micro-batch run every module the others run (FSDP); returns a mask of added positions or None."""
        return None

    @abstractmethod
    def eval_model(self, path: str, config: Any) -> tuple[Any, ModelGeometry]:
        """The checkpoint at `path` (config already read) and what eval prompts and inputs need of it."""

    @abstractmethod
    def eval_inputs(self, ids: Any, images: list[Any], geometry: ModelGeometry) -> dict[str, Any]:
        """Forward kwargs for a batch of prompts `ids` with one PIL image each."""

    # ---- anatomy: where this family keeps its parts, so shared code (freezing, FSDP, attention, lm-eval,
    # merge) asks the family instead of guessing attribute names. `model` is the transformers model (no peft).
    @abstractmethod
    def language_model(self, model: Any) -> Any:
        """The text decoder (embeddings, decoder layers, final norm; no LM head)."""

    @abstractmethod
    def decoder_layers(self, model: Any) -> list[Any]:
        """Every layer of the text decoder in order, cross-attention layers included (FSDP shards each)."""

    @abstractmethod
    def vision_tower(self, model: Any) -> Any | None:
        """The image encoder module (None for a model without one)."""

    @abstractmethod
    def vision_blocks(self, model: Any) -> list[Any]:
        """The image encoder's transformer blocks in order (FSDP shards each)."""

    @abstractmethod
    def projector(self, model: Any) -> Any:
        """The module mapping image features into the language model's space."""

    @abstractmethod
    def cross_attention_layers(self, model: Any) -> list[Any]:
        """Text layers that attend to the image (inside `language_model`); empty for in-sequence image tokens."""

    @abstractmethod
    def real_vocab_size(self, model: Any) -> int:
        """N for losses: the LM head's rows that are real classes (an added image-token row or padding excluded)."""


def rows_below_image_token(model: Any) -> int:
    """LM-head rows up to the image token id: the image token (and rows added after it) is never a class."""
    rows = model.get_output_embeddings().weight.shape[0]
    image_token = getattr(model.config, "image_token_id", None)
    if image_token is None:
        image_token = getattr(model.config, "image_token_index", None)
    return min(rows, int(image_token)) if image_token is not None else rows


class FamilyPlugin(ABC):
    """A registered family: its torch-free hooks, and the module holding its `FamilyRuntime` as `RUNTIME`."""

    name: ClassVar[str]
    model_type: ClassVar[str]  # the Hugging Face `config.model_type` of this family's checkpoints
    runtime_module: ClassVar[str]  # imported on first `runtime()`: keeps torch out of rendering
    composes_from_parts: ClassVar[bool] = False  # can build a model from `model.llm` + `model.vision_tower`
    # eval may score an item's options on its context's KV cache; False where the cache path cannot carry the
    # family's image inputs (Mllama's cross-attention states), so each option gets one full forward
    scores_on_context_cache: ClassVar[bool] = True

    @abstractmethod
    def geometry(self, model: ModelSection) -> VisionGeometry:
        """Image sizes for a recipe's `model:` section (tiny config, local model config, defaults, explicit keys)."""

    @abstractmethod
    def family(self, model: ModelSection, geometry: VisionGeometry) -> Family:
        """The render-side family object."""

    def check_config(self, family_config: Mapping[str, Any]) -> None:
        """Raise ValueError naming a `family_config` key this family needs and the manifest lacks."""

    def placeholders_per_image(self, image_tokens: int) -> int:
        """In-sequence image tokens per image, given the manifest's `image_tokens` (default: one)."""
        return 1

    def merge_name_map(self, vlm_names: Sequence[str], llm_names: Sequence[str]) -> Any:
        """The `mlan.families.name_map.NameMap` pairing this family's language-tower tensors (by name) with a
        base LLM's, for `mlan merge`. Torch-free: a merge streams tensors and loads no model."""
        raise MlanError(f"family {self.name!r} has no merge name map (mlan merge cannot pair its tensors)")

    def runtime(self) -> FamilyRuntime:
        return importlib.import_module(self.runtime_module).RUNTIME
