"""The model a run trains and its optimizer: a seeded build (every rank identical), the LM attention, the
freeze policy, LoRA adapters; AdamW over what is left trainable."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mlan.families import modeling
from mlan.recipe import Recipe, RecipeError, TrainSpec
from mlan.train.attention import set_attention
from mlan.train.schedule import STAGE_LR


def prepare_model(recipe: Recipe, family_config: dict[str, Any]) -> nn.Module:
    """Build (seeded, so every rank is identical), set the LM attention (`train.attention`), freeze by policy, add
    LoRA adapters."""
    torch.manual_seed(recipe.train.seed)
    model = modeling.build_model(recipe.model, family_config)
    set_attention(model, recipe.train.attention)
    freeze = modeling.freeze_policy(recipe.train.stage, recipe.train.freeze)
    modeling.apply_freeze(model, freeze)
    if recipe.train.lora.enabled:
        model = modeling.apply_lora(model, recipe.train.lora, freeze)
    return model


def make_optimizer(model: nn.Module, spec: TrainSpec) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; a fully frozen model is a recipe error."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise RecipeError("train.freeze: every parameter is frozen; nothing to train")
    return torch.optim.AdamW(params, lr=spec.lr or STAGE_LR[spec.stage], betas=spec.betas,
                             weight_decay=spec.weight_decay, foreach=True)
