"""LLaVA token accounting (torch-free): each image becomes N placeholder tokens in the sequence (N = image_tokens,
576 for CLIP-336), and the geometry that N comes from."""
from __future__ import annotations

from typing import TYPE_CHECKING

from mlan.families.base import Family, VisionGeometry
from mlan.families.llava import tiny
from mlan.families.local_config import load_local_config, vision_config

if TYPE_CHECKING:
    from mlan.recipe import ModelSpec

# Real default: CLIP ViT-L/14-336 (LLaVA-1.5).
LLAVA_IMAGE_SIZE, LLAVA_PATCH = 336, 14


def _read_geometry(model: ModelSpec) -> tuple[int, int, int | None, int | None]:
    """(image size, patch, image tokens or None, vocab or None) from the tiny sizes or the local model config."""
    if model.config == "tiny":
        # the vocabulary: the tokenizer's (None here: LlavaFamily.vocab_size counts the tokenizer)
        return tiny.TINY_LLAVA_IMAGE_SIZE, tiny.TINY_LLAVA_PATCH, tiny.TINY_LLAVA_IMAGE_TOKENS, None
    size, patch, tokens, vocab = LLAVA_IMAGE_SIZE, LLAVA_PATCH, None, None
    cfg = load_local_config(model.config)
    vision = getattr(cfg, "vision_config", None)
    if vision is None and model.vision_tower == "tiny":  # the random tiny tower (llava.model.vision_model)
        size, patch = tiny.TINY_LLAVA_IMAGE_SIZE, tiny.TINY_LLAVA_PATCH
        tokens = (size // patch) ** 2
    elif vision is None:  # composed from parts: the vision tower's own config
        tower = load_local_config(model.vision_tower)
        vision = vision_config(tower) if tower is not None else None
    if vision is not None and hasattr(vision, "image_size"):
        size, patch = int(vision.image_size), int(vision.patch_size)
    if cfg is not None and getattr(cfg, "image_seq_length", None):
        tokens = int(cfg.image_seq_length)
    if cfg is not None and hasattr(cfg, "text_config"):
        vocab = getattr(cfg.text_config, "vocab_size", None)
    return size, patch, tokens, vocab


def llava_geometry(model: ModelSpec) -> VisionGeometry:
    """Sizes from the tiny config, else the model's config when readable, else the real defaults.

    Explicit recipe keys (`model.image_size`, `model.image_tokens`) always win.
    """
    size, patch, tokens, vocab = _read_geometry(model)
    explicit = model.model_fields_set
    if tokens is None:
        tokens = model.image_tokens  # 576 unless the recipe says otherwise
    if "image_size" in explicit and model.image_size is not None:
        size = model.image_size
        tokens = (size // patch) ** 2  # CLS dropped, as LLaVA's default feature select
    if "image_tokens" in explicit:
        tokens = model.image_tokens
    return VisionGeometry(image_size=size, patch_size=patch, image_tokens=tokens, max_tiles=1, vocab_size=vocab)


class LlavaFamily(Family):
    """LLaVA-style: N placeholders per image in the sequence, one square image per placeholder group."""

    name = "llava"
    default_template = "llama3"

    def image_seq_tokens(self) -> int:
        return self.geometry.image_tokens

    def tiles_for(self, width: int, height: int) -> int:
        return 1

    def vision_tokens_for(self, width: int, height: int) -> int:
        return self.geometry.image_tokens

    def vocab_size(self) -> int:
        """LLaVA on Llama-3 trains an embedding row for the added image token: the whole tokenizer."""
        if self.geometry.vocab_size is not None:
            return self.geometry.vocab_size
        return len(self.tokenizer)

    def stored_image_size(self, width: int, height: int) -> tuple[int, int]:
        """The vision tower's square input."""
        return self.geometry.image_size, self.geometry.image_size
