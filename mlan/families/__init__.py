"""Model families: `get_family(model)` → the object that knows a family's image token, costs and template."""
from __future__ import annotations

from mlan.families.base import Family, VisionGeometry
from mlan.recipe import ModelSpec

FAMILIES = ("llava", "mllama")

# Real defaults: CLIP ViT-L/14-336 (LLaVA-1.5) and Llama-3.2-11B-Vision.
LLAVA_IMAGE_SIZE, LLAVA_PATCH = 336, 14
MLLAMA_TILE, MLLAMA_PATCH = 560, 14

# The sizes of mlan/families/tiny.py, mirrored so that rendering never imports transformers' model configs
# (and torch) into build workers; tests/test_families.py checks they stay equal.
TINY_LLAVA = {"image_size": 56, "patch_size": 14, "image_tokens": 16, "vocab_size": 128257}
TINY_MLLAMA = {"image_size": 56, "patch_size": 14, "max_tiles": 4, "vocab_size": 128256}


def _load_config(name: str | None):
    """A model/vision config from a local folder or the local Hugging Face cache; None when not available.

    Never goes to the network: rendering must not stall on an unreachable hub. Without a readable config
    the real defaults and the recipe's `model.*` keys apply, and family_config records what was used.
    """
    if not name or name == "tiny":
        return None
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError, KeyError):
        return None


def _vision_config(cfg):
    return getattr(cfg, "vision_config", None) or cfg


def _geometry(model: ModelSpec) -> VisionGeometry:
    """Sizes from the tiny configs, else the model's config when readable, else the real defaults.

    Explicit recipe keys (`model.image_size`, `model.image_tokens`, `model.max_tiles`) always win.
    """
    explicit = model.model_fields_set
    if model.family == "llava":
        size, patch, tokens, vocab = LLAVA_IMAGE_SIZE, LLAVA_PATCH, None, None
        if model.config == "tiny":
            size, patch, tokens = TINY_LLAVA["image_size"], TINY_LLAVA["patch_size"], TINY_LLAVA["image_tokens"]
            vocab = TINY_LLAVA["vocab_size"]
        else:
            cfg = _load_config(model.config)
            vision = getattr(cfg, "vision_config", None)
            if vision is None and model.vision_tower == "tiny":  # the random tiny tower (modeling._vision_model)
                size, patch = TINY_LLAVA["image_size"], TINY_LLAVA["patch_size"]
                tokens = (size // patch) ** 2
            elif vision is None:  # composed from parts: the vision tower's own config
                tower = _load_config(model.vision_tower)
                vision = _vision_config(tower) if tower is not None else None
            if vision is not None and hasattr(vision, "image_size"):
                size, patch = int(vision.image_size), int(vision.patch_size)
            if cfg is not None and getattr(cfg, "image_seq_length", None):
                tokens = int(cfg.image_seq_length)
            if cfg is not None and hasattr(cfg, "text_config"):
                vocab = getattr(cfg.text_config, "vocab_size", None)
        if tokens is None:
            tokens = model.image_tokens  # 576 unless the recipe says otherwise
        if "image_size" in explicit and model.image_size is not None:
            size = model.image_size
            tokens = (size // patch) ** 2  # CLS dropped, as LLaVA's default feature select
        if "image_tokens" in explicit:
            tokens = model.image_tokens
        return VisionGeometry(image_size=size, patch_size=patch, image_tokens=tokens, max_tiles=1, vocab_size=vocab)
    if model.family == "mllama":
        size, patch, tiles, vocab = MLLAMA_TILE, MLLAMA_PATCH, 4, None
        if model.config == "tiny":
            size, patch = TINY_MLLAMA["image_size"], TINY_MLLAMA["patch_size"]
            tiles, vocab = TINY_MLLAMA["max_tiles"], TINY_MLLAMA["vocab_size"]
        else:
            cfg = _load_config(model.config)
            if cfg is not None:
                vision = _vision_config(cfg)
                size, patch = int(vision.image_size), int(vision.patch_size)
                tiles = int(getattr(vision, "max_num_tiles", tiles))
                vocab = getattr(getattr(cfg, "text_config", None), "vocab_size", None)
        if "image_size" in explicit and model.image_size is not None:
            size = model.image_size
        if "max_tiles" in explicit:
            tiles = model.max_tiles
        return VisionGeometry(image_size=size, patch_size=patch, image_tokens=1, max_tiles=tiles, vocab_size=vocab)
    raise ValueError(f"unknown model family {model.family!r}; allowed: {', '.join(FAMILIES)}")


def get_family(model: ModelSpec) -> Family:
    """The family object for a recipe's `model:` section."""
    geometry = _geometry(model)
    if model.family == "llava":
        from mlan.families.llava import LlavaFamily

        return LlavaFamily(model, geometry)
    from mlan.families.mllama import MllamaFamily

    return MllamaFamily(model, geometry)


__all__ = ["FAMILIES", "Family", "VisionGeometry", "get_family"]
