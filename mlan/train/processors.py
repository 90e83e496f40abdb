"""The processor saved next to an exported model: the run's tokenizer plus the family's image processor.

Built from the build's `family_config` (the same geometry the loader used), never fetched from the hub.
"""
from __future__ import annotations

from typing import Any

from mlan.data.images import CLIP_MEAN, CLIP_STD


def family_processor(family_config: dict[str, Any], tokenizer) -> Any:
    """A LlavaProcessor or MllamaProcessor matching the training images."""
    family = family_config["family"]
    if family == "llava":
        from transformers import LlavaProcessor
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        size = int(family_config["image_size"])
        image_processor = CLIPImageProcessorPil(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size},
            image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
        return LlavaProcessor(
            image_processor=image_processor, tokenizer=tokenizer, patch_size=int(family_config["patch_size"]),
            vision_feature_select_strategy="default", image_token="<|image|>", num_additional_image_tokens=1)
    if family == "mllama":
        from transformers import MllamaProcessor
        from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

        tile = int(family_config["tile_size"])
        image_processor = MllamaImageProcessorPil(size={"height": tile, "width": tile},
                                               max_image_tiles=int(family_config["max_tiles"]))
        return MllamaProcessor(image_processor=image_processor, tokenizer=tokenizer)
    raise ValueError(f"family_config.family: unknown family {family!r}")
