"""LLaVA's image inputs: `pixel_values` for a collated batch and for eval prompts, and the blank image that
keeps a text-only micro-batch running the vision tower and projector (FSDP: same modules on every rank).

Images: CLIP-style resize (shortest edge) + center crop to `image_size` + CLIP normalisation → (3, S, S), by
transformers' PIL processor (no torchvision, the same numbers on every machine), built from the manifest's
`family_config`, never fetched from the hub."""
from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import torch
from PIL import Image
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from mlan.data.labels import IGNORE_INDEX
from mlan.families.base import ModelGeometry

# CLIP's normalisation constants (openai/clip-vit-large-patch14-336 preprocessor_config.json)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@lru_cache(maxsize=8)
def _clip_processor(image_size: int) -> CLIPImageProcessorPil:
    return CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_resize=True,
        do_center_crop=True,
        do_normalize=True,
        do_convert_rgb=True,
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )


def llava_pixel_values(images: list[Image.Image], image_size: int) -> torch.Tensor:
    """(n, 3, S, S) float32 for n decoded images, in the given order."""
    if not images:
        return torch.zeros(0, 3, image_size, image_size)
    out = _clip_processor(image_size)(images=images, return_tensors="pt")
    return out["pixel_values"].to(torch.float32)


def batch_images(fc: Any, decoded: list[list[Any]]) -> dict[str, torch.Tensor]:
    """Every image of the batch, in row order, as one (n, 3, S, S) tensor; nothing for a text-only batch."""
    images = [img for row in decoded for img in row]
    if not images:
        return {}
    if not fc.image_size:
        raise ValueError("family_config.image_size: missing, and the build has images (llava needs the side)")
    return {"pixel_values": llava_pixel_values(images, int(fc.image_size))}


def add_dummy_image(batch: dict[str, Any], family_config: Mapping[str, Any]) -> torch.Tensor | None:
    """A text-only LLaVA micro-batch gets one blank image as a document of its own; returns its positions.

    FSDP needs every rank to run the same modules (design invariant 5): a rank whose micro-batch holds no
    image would skip the vision tower's all-gathers while the others run them. The image's placeholders
    go in new columns at the end of row 0 with positions restarting at 0 (their own document, after every
    real token, so causal attention hides them) and labels −100; the trainer adds 0 × their logits to the
    loss so the backward reaches the projector on every rank too.
    """
    if "pixel_values" in batch:
        return None
    n, size = int(family_config["image_tokens"]), int(family_config["image_size"])
    ids, labels, pos = batch["input_ids"], batch["labels"], batch["position_ids"]
    b = ids.shape[0]
    new_ids = torch.zeros(b, n, dtype=ids.dtype)
    new_ids[0] = int(family_config["image_token_id"])
    batch["input_ids"] = torch.cat([ids, new_ids], dim=1)
    batch["labels"] = torch.cat([labels, torch.full((b, n), IGNORE_INDEX, dtype=labels.dtype)], dim=1)
    batch["position_ids"] = torch.cat([pos, torch.arange(n, dtype=pos.dtype).expand(b, n)], dim=1)
    batch["pixel_values"] = torch.zeros(1, 3, size, size)
    dummy = torch.zeros_like(batch["labels"], dtype=torch.bool)
    dummy[0, -n:] = True
    return dummy


def eval_inputs(images: list[Any], geometry: ModelGeometry) -> dict[str, torch.Tensor]:
    """One image per prompt, preprocessed as the training loader does."""
    return {"pixel_values": llava_pixel_values(images, geometry.image_size)}
