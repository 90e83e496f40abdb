"""Build and load the trainable model: a full VLM checkpoint, a LLaVA composed from parts, or a tiny config.

Also the module groups the freeze policy speaks of (vision_tower, projector, language_model,
cross_attention), MLAN's stage presets, and LoRA through peft on the language model's linear layers.
Every Mllama model built or loaded here gets the reference cross-attention semantics
(`mlan.families.mllama_patch.apply_reference_cross_attention`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mlan.errors import MlanError
from mlan.pretrained import gguf_path, is_pretrained_name, resolve_model_path
from mlan.recipe import FreezeSpec, LoraSpec, ModelSpec
from mlan.weights import check_model_dir

GROUPS = ("vision_tower", "projector", "language_model", "cross_attention")

# MLAN stage presets: stage 1 aligns the projector alone; stage 2 tunes language model + projector.
STAGE_FREEZE = {
    "stage1": FreezeSpec(vision_tower=True, projector=False, language_model=True, cross_attention=True),
    "stage2": FreezeSpec(vision_tower=True, projector=False, language_model=False, cross_attention=False),
    "custom": FreezeSpec(),
}


class ModelBuildError(MlanError, ValueError):
    """The model section cannot produce a model (names the key and the reason)."""


# ---------------------------------------------------------------- building
def build_model(model_spec: ModelSpec, family_config: dict[str, Any] | None = None) -> nn.Module:
    """The model a recipe names, in fp32 on CPU; seed torch first so every rank builds identical weights."""
    family_config = dict(family_config or {})
    family = family_config.get("family", model_spec.family)
    if family != model_spec.family:
        raise ModelBuildError(
            f"model.family: recipe says {model_spec.family!r}, the build's manifest says {family!r}")
    if model_spec.llm or model_spec.vision_tower or model_spec.config == "compose":
        model = compose_llava(model_spec, family_config)
    elif model_spec.config == "tiny":
        model = build_tiny(family, family_config)
    else:
        model = load_pretrained(model_spec.config, family)
    if family == "mllama":
        reference_cross_attention(model)
    return model


def reference_cross_attention(model: nn.Module) -> nn.Module:
    """Give an Mllama model Meta's cross-attention semantics (transformers issue #39379)."""
    from mlan.families.mllama_patch import apply_reference_cross_attention

    apply_reference_cross_attention(model)
    return model


def build_tiny(family: str, fc: dict[str, Any]) -> nn.Module:
    """A tiny model of the real architecture, with image geometry taken from the build's family_config."""
    from transformers import LlavaForConditionalGeneration, MllamaForConditionalGeneration

    from mlan.families import tiny

    if family == "llava":
        cfg = tiny.tiny_llava_config()
        size = int(fc.get("image_size") or cfg.vision_config.image_size)
        patch = int(fc.get("patch_size") or cfg.vision_config.patch_size)
        n_img = int(fc.get("image_tokens") or (size // patch) ** 2)
        if (size // patch) ** 2 != n_img:
            raise ModelBuildError(
                f"family_config: image_tokens={n_img} does not match image_size {size} / patch {patch} "
                f"= {(size // patch) ** 2} tokens (CLS dropped)")
        cfg.vision_config.image_size = size
        cfg.vision_config.patch_size = patch
        cfg.image_seq_length = n_img
        image_token = int(fc.get("image_token_id", tiny.IMAGE_TOKEN_ID))
        cfg.image_token_index = image_token
        cfg.text_config.vocab_size = max(int(fc.get("vocab_size") or 0), image_token + 1, tiny.LLAMA3_VOCAB)
        return LlavaForConditionalGeneration(cfg)
    if family == "mllama":
        cfg = tiny.tiny_mllama_config()
        cfg.vision_config.image_size = int(fc.get("tile_size") or cfg.vision_config.image_size)
        if fc.get("patch_size"):
            cfg.vision_config.patch_size = int(fc["patch_size"])
        cfg.vision_config.max_num_tiles = int(fc.get("max_tiles") or cfg.vision_config.max_num_tiles)
        return MllamaForConditionalGeneration(cfg)
    raise ModelBuildError(f"model.family: unknown family {family!r}; allowed: llava, mllama")


def check_model_files(model_spec: ModelSpec) -> None:
    """Before any worker starts: each checkpoint the recipe names (model.config, model.llm,
    model.vision_tower) is a local folder with sound safetensors weights, or a hub id; a path that is not
    there is a ModelBuildError naming the key."""
    named = {"model.llm": model_spec.llm, "model.vision_tower": model_spec.vision_tower}
    if model_spec.config not in ("tiny", "compose") and not (model_spec.llm or model_spec.vision_tower):
        named["model.config"] = model_spec.config
    for key, value in named.items():
        if not value or (key == "model.vision_tower" and value == "tiny"):  # a random tower: no files
            continue
        if is_pretrained_name(value):  # a named offline base: its package must be there (one line if not)
            gguf_path(value)
            continue
        path = Path(value).expanduser()
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise ModelBuildError(f"{key}: {value}: not a model folder (no config.json)")
            try:
                check_model_dir(path)
            except MlanError as err:
                raise ModelBuildError(f"{key}: {err}") from None
        elif path.exists() or value.startswith((".", "/", "~")) or value.count("/") != 1:
            raise ModelBuildError(f"{key}: {value}: no such model folder (and not a hub id of the form owner/name)")


def load_pretrained(path_or_id: str, family: str) -> nn.Module:
    """A full VLM checkpoint (local save_pretrained folder or hub id) of the named family."""
    from transformers import AutoConfig, LlavaForConditionalGeneration, MllamaForConditionalGeneration

    check_model_dir(path_or_id)
    cfg = AutoConfig.from_pretrained(path_or_id)
    classes = {"llava": LlavaForConditionalGeneration, "mllama": MllamaForConditionalGeneration}
    if cfg.model_type != family:
        raise ModelBuildError(
            f"model.config: {path_or_id!r} is a {cfg.model_type!r} checkpoint, the recipe's family is {family!r} "
            "(to compose LLaVA from a base LLM, set model.llm and model.vision_tower instead)")
    return classes[family].from_pretrained(path_or_id, dtype=torch.float32, use_safetensors=True)


def _vision_model(path_or_id: str, fc: dict[str, Any] | None = None) -> nn.Module:
    """The vision half of a CLIP or SigLIP checkpoint (a full dual-encoder checkpoint is fine).

    `tiny` is a small *randomly initialised* CLIP tower (mlan/families/tiny.py) at the build's image size:
    no pretrained CLIP/SigLIP weights are reachable offline, so a real LLM gets a random tower.
    """
    from transformers import AutoConfig, CLIPVisionModel, SiglipVisionModel

    if path_or_id == "tiny":
        from mlan.families import tiny

        vcfg = tiny.tiny_llava_config().vision_config
        fc = fc or {}
        vcfg.image_size = int(fc.get("image_size") or vcfg.image_size)
        vcfg.patch_size = int(fc.get("patch_size") or vcfg.patch_size)
        return CLIPVisionModel(vcfg)

    check_model_dir(path_or_id)
    kind = AutoConfig.from_pretrained(path_or_id).model_type
    if kind in ("clip", "clip_vision_model"):
        return CLIPVisionModel.from_pretrained(path_or_id, dtype=torch.float32, use_safetensors=True)
    if kind in ("siglip", "siglip_vision_model"):
        return SiglipVisionModel.from_pretrained(path_or_id, dtype=torch.float32, use_safetensors=True)
    raise ModelBuildError(f"model.vision_tower: {path_or_id!r} is a {kind!r} model; expected CLIP or SigLIP")


def compose_llava(model_spec: ModelSpec, fc: dict[str, Any]) -> nn.Module:
    """LLaVA-1.5 style: base LLM + CLIP/SigLIP tower (penultimate layer) + a fresh 2-layer GELU projector."""
    from transformers import AutoModelForCausalLM, LlavaConfig, LlavaForConditionalGeneration
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    if model_spec.family != "llava":
        raise ModelBuildError("model.llm/model.vision_tower: composing from parts is for family llava only")
    if not (model_spec.llm and model_spec.vision_tower):
        raise ModelBuildError("model: composing LLaVA needs both model.llm and model.vision_tower")
    if model_spec.config not in ("compose", "tiny"):
        raise ModelBuildError(
            f"model.config = {model_spec.config!r}: give either a full checkpoint in model.config "
            "or model.llm + model.vision_tower, not both")
    llm_path = resolve_model_path(model_spec.llm)
    check_model_dir(llm_path)
    llm = AutoModelForCausalLM.from_pretrained(llm_path, dtype=torch.float32, use_safetensors=True)
    vision = _vision_model(model_spec.vision_tower, fc)
    vcfg = vision.config
    siglip = vcfg.model_type.startswith("siglip")
    n_img = (vcfg.image_size // vcfg.patch_size) ** 2
    want = int(fc.get("image_tokens") or model_spec.image_tokens)
    if want != n_img:
        raise ModelBuildError(
            f"model.image_tokens = {want}: the vision tower {model_spec.vision_tower!r} gives {n_img} tokens "
            f"({vcfg.image_size}px / patch {vcfg.patch_size})")
    image_token = int(fc.get("image_token_id", llm.config.vocab_size))
    cfg = LlavaConfig(
        vision_config=vcfg.to_dict(),
        text_config=llm.config.to_dict(),
        image_token_index=image_token,
        image_seq_length=n_img,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="full" if siglip else "default",
        vision_feature_layer=-2,
    )
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(cfg)
    model.model.language_model = llm.model
    model.lm_head = llm.lm_head
    model.model.vision_tower = vision
    model.model.multi_modal_projector = LlavaMultiModalProjector(cfg)
    if image_token >= llm.config.vocab_size:  # room for the image token row (never a training target)
        model.resize_token_embeddings(image_token + 1, mean_resizing=True)
    model.config.text_config.vocab_size = model.get_input_embeddings().weight.shape[0]
    return model


# ---------------------------------------------------------------- groups, freezing, LoRA
def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _is_cross_attention_layer(layer: nn.Module) -> bool:
    return "CrossAttention" in type(layer).__name__


def module_groups(model: nn.Module) -> dict[str, list[nn.Module]]:
    """The freezable parts of a LLaVA or Mllama model, by group name."""
    core = unwrap(model)
    inner = core.model
    vision = getattr(inner, "vision_tower", None) or getattr(inner, "vision_model", None)
    lm = inner.language_model
    cross = [layer for layer in lm.layers if _is_cross_attention_layer(layer)]
    return {
        "vision_tower": [vision] if vision is not None else [],
        "projector": [inner.multi_modal_projector],
        "language_model": [lm, core.lm_head],
        "cross_attention": cross,
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
    from peft import LoraConfig, get_peft_model

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
    """N for losses: lm_head rows minus an added image-token row and padded rows (Mllama's extra 8)."""
    core = unwrap(model)
    rows = core.get_output_embeddings().weight.shape[0]
    image_token = getattr(core.config, "image_token_id", None)
    if image_token is None:
        image_token = getattr(core.config, "image_token_index", None)
    return min(rows, int(image_token)) if image_token is not None else rows


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
    params = sum(p.numel() for p in lm.parameters()) - lm.embed_tokens.weight.numel()
    params += core.lm_head.weight.numel()
    return FlopsModel(params=params, layers=text.num_hidden_layers, hidden=text.hidden_size)


def trainable_summary(model: nn.Module) -> dict[str, int]:
    """Trainable and total parameter counts (shown at startup)."""
    total = sum(p.numel() for p in model.parameters())
    train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": train, "total": total, "trainable_pct": math.floor(1000 * train / max(total, 1)) / 10}
