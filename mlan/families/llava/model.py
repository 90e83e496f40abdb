"""LLaVA models and processor: a tiny config at the build's geometry, a full checkpoint, or LLaVA-1.5 composed
from a base LLM and a CLIP/SigLIP tower; the LlavaProcessor saved next to an export."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    CLIPVisionModel,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    SiglipVisionModel,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from mlan.families.base import ModelBuildError
from mlan.families.llava import tiny
from mlan.families.llava.inputs import CLIP_MEAN, CLIP_STD
from mlan.pretrained import resolve_model_path
from mlan.recipe import ModelSpec
from mlan.weights import check_model_dir, load_checked

# what a vision tower read from a full CLIP / SigLIP checkpoint leaves unused (the text half and the heads)
TEXT_HALF = ("text_model.", "text_projection.", "visual_projection.", "logit_scale", "logit_bias")


def build_tiny(fc: Mapping[str, Any]) -> nn.Module:
    """A tiny LLaVA with image geometry taken from the build's family_config."""
    image_token = int(fc.get("image_token_id") or tiny.IMAGE_TOKEN_ID)
    vocab = max(int(fc.get("vocab_size") or tiny.TINY_LLAVA_VOCAB), image_token + 1)  # the tokenizer's
    cfg = tiny.tiny_llava_config(vocab_size=vocab, image_token_id=image_token)
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
    return LlavaForConditionalGeneration(cfg)


def load_pretrained(path_or_id: str) -> nn.Module:
    return LlavaForConditionalGeneration.from_pretrained(path_or_id, dtype=torch.float32, use_safetensors=True)


def vision_model(path_or_id: str, fc: Mapping[str, Any] | None = None) -> nn.Module:
    """The vision half of a CLIP or SigLIP checkpoint (a full dual-encoder checkpoint is fine).

    `tiny` is a small *randomly initialised* CLIP tower (mlan/families/llava/tiny.py) at the build's image size:
    no pretrained CLIP/SigLIP weights are reachable offline, so a real LLM gets a random tower.
    """
    if path_or_id == "tiny":
        vcfg = tiny.tiny_llava_config().vision_config
        fc = fc or {}
        vcfg.image_size = int(fc.get("image_size") or vcfg.image_size)
        vcfg.patch_size = int(fc.get("patch_size") or vcfg.patch_size)
        return CLIPVisionModel(vcfg)

    check_model_dir(path_or_id)
    kind = AutoConfig.from_pretrained(path_or_id).model_type
    # damaged weights are one line naming the tensor (mlan.weights.load_checked), as for a full checkpoint
    if kind in ("clip", "clip_vision_model"):
        return load_checked(CLIPVisionModel.from_pretrained, path_or_id, other_half=TEXT_HALF)
    if kind in ("siglip", "siglip_vision_model"):
        return load_checked(SiglipVisionModel.from_pretrained, path_or_id, other_half=TEXT_HALF)
    raise ModelBuildError(f"model.vision_tower: {path_or_id!r} is a {kind!r} model; expected CLIP or SigLIP")


def _check_parts(model_spec: ModelSpec) -> None:
    if not (model_spec.llm and model_spec.vision_tower):
        raise ModelBuildError("model: composing LLaVA needs both model.llm and model.vision_tower")
    if model_spec.config not in ("compose", "tiny"):
        raise ModelBuildError(
            f"model.config = {model_spec.config!r}: give either a full checkpoint in model.config "
            "or model.llm + model.vision_tower, not both")


def compose(model_spec: ModelSpec, fc: Mapping[str, Any]) -> nn.Module:
    """LLaVA-1.5 style: base LLM + CLIP/SigLIP tower (penultimate layer) + a fresh 2-layer GELU projector."""
    _check_parts(model_spec)
    llm_path = resolve_model_path(model_spec.llm)
    llm = load_checked(AutoModelForCausalLM.from_pretrained, llm_path)
    vision = vision_model(model_spec.vision_tower, fc)
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


def processor(fc: Mapping[str, Any], tokenizer: Any) -> LlavaProcessor:
    """A LlavaProcessor whose CLIP image processor matches the training images."""
    size = int(fc["image_size"])
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size},
        image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=int(fc["patch_size"]),
        vision_feature_select_strategy="default", image_token="<|image|>", num_additional_image_tokens=1)
