"""LLaVA's torch side for the registry (`FamilyPlugin.runtime()`): models, processor and inputs wired together."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from transformers import LlavaForConditionalGeneration

from mlan.families.base import FamilyRuntime, ModelGeometry, rows_below_image_token
from mlan.families.llava import inputs, model
from mlan.recipe import ModelSpec
from mlan.weights import load_checked


class LlavaRuntime(FamilyRuntime):
    def build_tiny(self, family_config: Mapping[str, Any]) -> nn.Module:
        return model.build_tiny(family_config)

    def load_pretrained(self, path_or_id: str) -> nn.Module:
        """The checkpoint, refused (one WeightsError naming the tensor) if damaged: see mlan.weights.load_checked."""
        return load_checked(LlavaForConditionalGeneration.from_pretrained, path_or_id)

    def compose(self, model_spec: ModelSpec, family_config: Mapping[str, Any]) -> nn.Module:
        return model.compose(model_spec, family_config)

    def processor(self, family_config: Mapping[str, Any], tokenizer: Any) -> Any:
        return model.processor(family_config, tokenizer)

    def batch_images(self, family_config: Any, rows: Sequence[Any], decoded: list[list[Any]], length: int,
                     always_images: bool) -> dict[str, torch.Tensor]:
        return inputs.batch_images(family_config, decoded)

    def same_modules_inputs(self, batch: dict[str, Any], family_config: Mapping[str, Any]) -> torch.Tensor | None:
        return inputs.add_dummy_image(batch, family_config)

    def eval_model(self, path: str, config: Any) -> tuple[nn.Module, ModelGeometry]:
        vc = config.vision_config
        n = int(getattr(config, "image_seq_length", 0) or (vc.image_size // vc.patch_size) ** 2)
        geometry = ModelGeometry("llava", int(config.get_text_config().vocab_size), int(config.image_token_id), n,
                                 int(vc.image_size), int(vc.patch_size), None, 1)
        return self.load_pretrained(path), geometry

    def eval_inputs(self, ids: torch.Tensor, images: list[Any], geometry: ModelGeometry) -> dict[str, torch.Tensor]:
        return inputs.eval_inputs(images, geometry)

    # ---- anatomy (FamilyRuntime): LlavaForConditionalGeneration keeps its parts under `.model`
    def language_model(self, built: nn.Module) -> nn.Module:
        return built.model.language_model

    def decoder_layers(self, built: nn.Module) -> list[nn.Module]:
        return list(self.language_model(built).layers)

    def vision_tower(self, built: nn.Module) -> nn.Module:
        return built.model.vision_tower

    def vision_blocks(self, built: nn.Module) -> list[nn.Module]:
        """The encoder layers of a CLIP / SigLIP vision model (`vision_model.encoder.layers`), or of a tower that
        is itself the encoder (`encoder.layers`)."""
        tower = self.vision_tower(built)
        body = getattr(tower, "vision_model", tower)
        encoder = getattr(body, "encoder", None)
        return list(encoder.layers) if encoder is not None else []

    def projector(self, built: nn.Module) -> nn.Module:
        return built.model.multi_modal_projector

    def cross_attention_layers(self, built: nn.Module) -> list[nn.Module]:
        return []  # image features enter as in-sequence tokens

    def real_vocab_size(self, built: nn.Module) -> int:
        return rows_below_image_token(built)


RUNTIME = LlavaRuntime()
