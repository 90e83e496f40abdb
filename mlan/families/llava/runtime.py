"""LLaVA's torch side for the registry (`FamilyPlugin.runtime()`): models, processor and inputs wired together."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from transformers import LlavaForConditionalGeneration

from mlan.families.base import FamilyRuntime, ModelGeometry
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


RUNTIME = LlavaRuntime()
