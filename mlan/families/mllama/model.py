"""Mllama models and processor: a tiny config at the build's tile geometry or a full checkpoint; the
MllamaProcessor saved next to an export."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from transformers import MllamaForConditionalGeneration, MllamaProcessor
from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

from mlan.families.mllama import tiny


def build_tiny(fc: Mapping[str, Any]) -> nn.Module:
    """A tiny Mllama with the tile side, patch and tile count of the build's family_config."""
    cfg = tiny.tiny_mllama_config(vocab_size=int(fc.get("vocab_size") or tiny.LLAMA3_VOCAB),
                                  image_token_id=int(fc.get("image_token_id") or tiny.IMAGE_TOKEN_ID))
    cfg.vision_config.image_size = int(fc.get("tile_size") or cfg.vision_config.image_size)
    if fc.get("patch_size"):
        cfg.vision_config.patch_size = int(fc["patch_size"])
    cfg.vision_config.max_num_tiles = int(fc.get("max_tiles") or cfg.vision_config.max_num_tiles)
    return MllamaForConditionalGeneration(cfg)


def load_pretrained(path_or_id: str) -> nn.Module:
    return MllamaForConditionalGeneration.from_pretrained(path_or_id, dtype=torch.float32, use_safetensors=True)


def processor(fc: Mapping[str, Any], tokenizer: Any) -> MllamaProcessor:
    """A MllamaProcessor whose image processor tiles as the training loader tiles."""
    tile = int(fc["tile_size"])
    image_processor = MllamaImageProcessorPil(size={"height": tile, "width": tile},
                                              max_image_tiles=int(fc["max_tiles"]))
    return MllamaProcessor(image_processor=image_processor, tokenizer=tokenizer)
