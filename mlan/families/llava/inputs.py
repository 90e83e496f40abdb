"""LLaVA's image inputs: `pixel_values` for a collated batch and for eval prompts, and the blank image that
keeps a text-only micro-batch running the vision tower and projector (FSDP: same modules on every rank)."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from mlan.data.images import llava_pixel_values
from mlan.families.base import EvalGeometry
from mlan.train.losses import IGNORE_INDEX


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


def eval_inputs(images: list[Any], geometry: EvalGeometry) -> dict[str, torch.Tensor]:
    """One image per prompt, preprocessed as the training loader does."""
    return {"pixel_values": llava_pixel_values(images, geometry.image_size)}
