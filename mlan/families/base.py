"""The model-family protocol, render side: image token, per-image costs, default template, config summary.

A family is everything that differs between model families *for the data*; model building, collate and
weight-name maps hang off the same object in their own modules.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import cached_property

from mlan.recipe import ModelSpec

IMAGE_TOKEN_CANDIDATES = ("<|image|>", "<image>")  # Llama-3.2-Vision / mlan's llama3, then LLaVA's


@dataclass(frozen=True)
class VisionGeometry:
    """Image-side sizes a family needs for token accounting (resolved from the recipe and the model config)."""

    image_size: int  # llava: vision input side; mllama: tile side
    patch_size: int
    image_tokens: int  # llava: in-sequence placeholders per image; mllama: 1
    max_tiles: int  # mllama; 1 for llava
    vocab_size: int | None = None  # the LM's output rows, when the model config says so


class Family(ABC):
    """One model family; built by `mlan.families.get_family(model)`."""

    name: str
    default_template: str = "llama3"

    def __init__(self, model: ModelSpec, geometry: VisionGeometry):
        self.model = model
        self.geometry = geometry

    @cached_property
    def tokenizer(self):
        from mlan.tokenizer import load_tokenizer

        return load_tokenizer(self.model.tokenizer)

    @property
    def template(self) -> str:
        """The template a recipe gets when `model.template` is unset."""
        return self.model.template or self.default_template

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

    def family_config(self) -> dict:
        """The manifest's `family_config`: what a trainer needs to check shards against its model."""
        g = self.geometry
        return {
            "family": self.name,
            "vocab_size": self.vocab_size(),
            "image_token_id": self.image_token_id if self.image_token is not None else None,
            "image_tokens": self.image_seq_tokens(),
            "image_size": g.image_size,
            "patch_size": g.patch_size,
            "tile_size": g.image_size if self.name == "mllama" else None,
            "max_tiles": g.max_tiles,
        }
