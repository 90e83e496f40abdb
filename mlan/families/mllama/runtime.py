"""Mllama's torch side for the registry (`FamilyPlugin.runtime()`): every model it builds or loads carries Meta's
reference cross-attention (`mlan.families.mllama.patch`)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from transformers import MllamaForConditionalGeneration

from mlan.families.base import FamilyRuntime, ModelGeometry, rows_below_image_token
from mlan.families.mllama import inputs, model
from mlan.families.mllama.patch import apply_reference_cross_attention
from mlan.weights import load_checked


class MllamaRuntime(FamilyRuntime):
    def build_tiny(self, family_config: Mapping[str, Any]) -> nn.Module:
        return model.build_tiny(family_config)

    def load_pretrained(self, path_or_id: str) -> nn.Module:
        """The checkpoint, refused (one WeightsError naming the tensor) if damaged: see mlan.weights.load_checked."""
        return load_checked(MllamaForConditionalGeneration.from_pretrained, path_or_id)

    def prepare(self, built: nn.Module) -> nn.Module:
        """Meta's cross-attention semantics (transformers issue #39379)."""
        return apply_reference_cross_attention(built)

    def processor(self, family_config: Mapping[str, Any], tokenizer: Any) -> Any:
        return model.processor(family_config, tokenizer)

    def batch_images(self, family_config: Any, rows: Sequence[Any], decoded: list[list[Any]], length: int,
                     always_images: bool) -> dict[str, torch.Tensor]:
        return inputs.batch_images(family_config, rows, decoded, length, always_images)

    def eval_model(self, path: str, config: Any) -> tuple[nn.Module, ModelGeometry]:
        vc = config.vision_config
        loaded = self.prepare(self.load_pretrained(path))
        return loaded, ModelGeometry("mllama", int(config.get_text_config().vocab_size), int(config.image_token_id), 1,
                                     int(vc.image_size), int(vc.patch_size), int(vc.image_size), int(vc.max_num_tiles))

    def eval_inputs(self, ids: torch.Tensor, images: list[Any], geometry: ModelGeometry) -> dict[str, torch.Tensor]:
        return inputs.eval_inputs(ids, images, geometry)

    # ---- anatomy (FamilyRuntime): MllamaForConditionalGeneration keeps its parts under `.model`
    def language_model(self, built: nn.Module) -> nn.Module:
        return built.model.language_model

    def decoder_layers(self, built: nn.Module) -> list[nn.Module]:
        return list(self.language_model(built).layers)

    def vision_tower(self, built: nn.Module) -> nn.Module:
        return built.model.vision_model

    def vision_blocks(self, built: nn.Module) -> list[nn.Module]:
        """The local encoder's layers, then the global encoder's (the tiles' order of computation)."""
        tower = self.vision_tower(built)
        return [*tower.transformer.layers, *tower.global_transformer.layers]

    def projector(self, built: nn.Module) -> nn.Module:
        return built.model.multi_modal_projector

    def cross_attention_layers(self, built: nn.Module) -> list[nn.Module]:
        """The text layers the config names as cross-attention (3, 8, 13, … in the 11B model)."""
        layers = self.decoder_layers(built)
        return [layers[i] for i in sorted(built.config.text_config.cross_attention_layers)]

    def real_vocab_size(self, built: nn.Module) -> int:
        return rows_below_image_token(built)  # the lm_head has no image-token row; the embedding's 8 extra rows


RUNTIME = MllamaRuntime()
