"""Build and load the trainable model through its family's plug-in, and what is family-agnostic about it.

The family decides how a tiny config, a full checkpoint or a model composed from parts is built
(`mlan.families.<name>.model`); here: the checks every build shares, the module groups the freeze policy
speaks of (vision_tower, projector, language_model, cross_attention), MLAN's stage presets, LoRA through
peft on the language model's linear layers, and the facts the trainer needs (vocabulary, FLOPs).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch import nn
from transformers import AutoConfig

from mlan.families.base import FamilyPlugin, FamilyRuntime, ModelBuildError
from mlan.families.registry import config_marks, family_for_config, family_names, family_plugin
from mlan.recipe import FreezeSpec, LoraSpec, ModelSpec
from mlan.weights import check_model_dir

GROUPS = ("vision_tower", "projector", "language_model", "cross_attention")

# MLAN stage presets: stage 1 aligns the projector alone; stage 2 tunes language model + projector.
STAGE_FREEZE = {
    "stage1": FreezeSpec(vision_tower=True, projector=False, language_model=True, cross_attention=True),
    "stage2": FreezeSpec(vision_tower=True, projector=False, language_model=False, cross_attention=False),
    "custom": FreezeSpec(),
}


# ---------------------------------------------------------------- building
def build_model(model_spec: ModelSpec, family_config: dict[str, Any] | None = None) -> nn.Module:
    """The model a recipe names, in fp32 on CPU; seed torch first so every rank builds identical weights."""
    family_config = dict(family_config or {})
    family = family_config.get("family", model_spec.family)
    if family != model_spec.family:
        raise ModelBuildError(
            f"model.family: recipe says {model_spec.family!r}, the build's manifest says {family!r}")
    plugin = family_plugin(family)
    runtime = plugin.runtime()
    if model_spec.llm or model_spec.vision_tower or model_spec.config == "compose":
        if not plugin.composes_from_parts:
            composers = " / ".join(n for n in family_names() if family_plugin(n).composes_from_parts)
            raise ModelBuildError(f"model.llm/model.vision_tower: composing from parts is for family {composers} only")
        model = runtime.compose(model_spec, family_config)
    elif model_spec.config == "tiny":
        model = runtime.build_tiny(family_config)
    else:
        model = load_pretrained(model_spec.config, plugin)
    for key, value in config_marks(plugin).items():  # saved with the model: eval and merge find the family
        setattr(model.config, key, value)
    return runtime.prepare(model)


def load_pretrained(path_or_id: str, plugin: FamilyPlugin) -> nn.Module:
    """A full VLM checkpoint (local save_pretrained folder or hub id) of the plug-in's family."""
    check_model_dir(path_or_id)
    cfg = AutoConfig.from_pretrained(path_or_id)
    if cfg.model_type != plugin.model_type:
        raise ModelBuildError(
            f"model.config: {path_or_id!r} is a {cfg.model_type!r} checkpoint, the recipe's family is {plugin.name!r} "
            "(to compose LLaVA from a base LLM, set model.llm and model.vision_tower instead)")
    return plugin.runtime().load_pretrained(path_or_id)


# ---------------------------------------------------------------- groups, freezing, LoRA
def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def model_runtime(model: nn.Module) -> FamilyRuntime:
    """The torch side of the model's family (from its config: `mlan_family`, else `model_type`)."""
    config = unwrap(model).config
    plugin = family_for_config(config)
    if plugin is None:
        raise ModelBuildError(f"a {config.model_type!r} model is of no registered family "
                              f"({', '.join(family_names())})")
    return plugin.runtime()


def module_groups(model: nn.Module) -> dict[str, list[nn.Module]]:
    """The freezable parts of a model of a registered family, by group name (the family says where they are)."""
    core = unwrap(model)
    runtime = model_runtime(core)
    vision = runtime.vision_tower(core)
    return {
        "vision_tower": [vision] if vision is not None else [],
        "projector": [runtime.projector(core)],
        "language_model": [runtime.language_model(core), core.get_output_embeddings()],
        "cross_attention": runtime.cross_attention_layers(core),
    }


def _set_trainable(modules: list[nn.Module], trainable: bool) -> None:
    for m in modules:
        for p in m.parameters():
            p.requires_grad_(trainable)


def freeze_policy(stage: str, freeze: FreezeSpec | None) -> FreezeSpec:
    """The explicit `train.freeze` block, else the stage's preset."""
    return freeze if freeze is not None else STAGE_FREEZE[stage]


def apply_freeze(model: nn.Module, freeze: FreezeSpec) -> None:
    """requires_grad per module group; cross_attention overrides language_model for Mllama's cross layers."""
    groups = module_groups(model)
    for name in GROUPS:  # order matters: cross_attention layers sit inside language_model
        _set_trainable(groups[name], not getattr(freeze, name))


def lora_targets(model: nn.Module) -> list[str]:
    """Full names of every nn.Linear inside the language model (lm_head and vision parts excluded)."""
    lm = module_groups(model)["language_model"][0]
    names = {id(m): n for n, m in model.named_modules()}
    return sorted(names[id(m)] for m in lm.modules() if isinstance(m, nn.Linear))


def lora_rank(model: nn.Module, lora: LoraSpec) -> int:
    return lora.rank or max(1, unwrap(model).config.get_text_config().hidden_size // 2)


def apply_lora(model: nn.Module, lora: LoraSpec, freeze: FreezeSpec) -> nn.Module:
    """peft LoRA on all LLM linear layers (r = hidden/2, rsLoRA); non-LLM groups keep the freeze policy."""
    from peft import LoraConfig, get_peft_model  # lazy: importing peft costs ~3 s, and only LoRA runs need it

    config = LoraConfig(
        r=lora_rank(model, lora),
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        use_rslora=lora.rslora,
        target_modules=lora_targets(model),
        bias="none",
    )
    peft_model = get_peft_model(model, config)  # freezes every base weight
    groups = module_groups(peft_model)
    _set_trainable(groups["vision_tower"], not freeze.vision_tower)
    _set_trainable(groups["projector"], not freeze.projector)
    return peft_model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold the adapters into the base weights: the export is a plain transformers model."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


# ---------------------------------------------------------------- facts the trainer needs
def real_vocab_size(model: nn.Module) -> int:
    """N for losses: lm_head rows minus an added image-token row and padded rows (the family says which)."""
    core = unwrap(model)
    return model_runtime(core).real_vocab_size(core)


@dataclass(frozen=True)
class FlopsModel:
    """Training FLOPs per sequence token (6·params + attention), for MFU."""

    params: int
    layers: int
    hidden: int

    def per_token(self, seq_len: int) -> float:
        return 6.0 * self.params + 12.0 * self.layers * self.hidden * seq_len


def flops_model(model: nn.Module) -> FlopsModel:
    core = unwrap(model)
    text = core.config.get_text_config()
    lm = module_groups(model)["language_model"][0]
    params = sum(p.numel() for p in lm.parameters()) - lm.get_input_embeddings().weight.numel()
    params += core.get_output_embeddings().weight.numel()
    return FlopsModel(params=params, layers=text.num_hidden_layers, hidden=text.hidden_size)


def trainable_summary(model: nn.Module) -> dict[str, int]:
    """Trainable and total parameter counts (shown at startup)."""
    total = sum(p.numel() for p in model.parameters())
    train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": train, "total": total, "trainable_pct": math.floor(1000 * train / max(total, 1)) / 10}
