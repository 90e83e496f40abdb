"""The end of a run: the trained weights as a Hugging Face `save_pretrained` folder (LoRA merged), with the
tokenizer and image processor beside them so `AutoProcessor.from_pretrained(out)` works."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from mlan.errors import TrainError
from mlan.families import modeling
from mlan.recipe import Recipe
from mlan.tokenizer import load_tokenizer
from mlan.train import checkpoint as ckpt
from mlan.train.model import prepare_model
from mlan.train.parallel import DistEnv
from mlan.train.processors import family_processor


def export(model: nn.Module, recipe: Recipe, family_config: dict[str, Any], out: Path, env: DistEnv) -> None:
    """Collective: gather the full weights; rank 0 rebuilds the model, merges LoRA, save_pretrained()s it."""
    full = ckpt.full_model_state(model)
    if not env.is_main:
        return
    plain = prepare_model(recipe, family_config)
    missing, unexpected = plain.load_state_dict(full, strict=False)
    if missing or unexpected:
        raise TrainError(f"export: state dict mismatch (missing {missing[:3]}, unexpected {unexpected[:3]})")
    plain = modeling.merge_lora(plain)
    out.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(out, safe_serialization=True)
    save_processor(recipe, family_config, out)


def save_processor(recipe: Recipe, family_config: dict[str, Any], out: Path) -> None:
    """Tokenizer and image processor next to the weights, so `AutoProcessor.from_pretrained(out)` works."""
    tok = load_tokenizer(recipe.model.tokenizer)
    tok.save_pretrained(out)
    processor = family_processor(family_config, tok)
    if processor is not None:
        processor.save_pretrained(out)
