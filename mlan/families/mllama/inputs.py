"""Mllama's image inputs: tiled pixel values, aspect-ratio ids and masks, and the cross-attention mask that ends
each image's span at its own document's end (packed rows) or at the prompt's end (eval).

Tiling is transformers' PIL `MllamaImageProcessor` (≤ `max_tiles` tiles of `tile_size`; no torchvision, the
same numbers on every machine), built from the manifest's `family_config`, never fetched from the hub."""
from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import get_worker_info
from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

from mlan.families.base import ModelGeometry


@lru_cache(maxsize=8)
def _mllama_processor(tile_size: int, max_tiles: int) -> MllamaImageProcessorPil:
    return MllamaImageProcessorPil(size={"height": tile_size, "width": tile_size}, max_image_tiles=max_tiles)


@dataclass(frozen=True)
class MllamaImages:
    """Processed Mllama images: one entry per image, padded to `max_tiles` tiles."""

    pixel_values: torch.Tensor  # (n, max_tiles, 3, T, T)
    aspect_ratio_ids: torch.Tensor  # (n,) int64, ≥ 1 for a real image
    aspect_ratio_mask: torch.Tensor  # (n, max_tiles) int64, 1 on valid tiles
    num_tiles: list[int]


def mllama_images(images: list[Image.Image], tile_size: int, max_tiles: int) -> MllamaImages:
    """Tile each image with Meta's aspect-ratio policy (the processor treats each image as its own sample)."""
    if not images:
        return MllamaImages(torch.zeros(0, max_tiles, 3, tile_size, tile_size), torch.zeros(0, dtype=torch.long),
                            torch.zeros(0, max_tiles, dtype=torch.long), [])
    out = _mllama_processor(tile_size, max_tiles)(images=[[img] for img in images], return_tensors="pt")
    return MllamaImages(
        pixel_values=out["pixel_values"][:, 0].to(torch.float32),
        aspect_ratio_ids=out["aspect_ratio_ids"][:, 0].to(torch.long),
        aspect_ratio_mask=out["aspect_ratio_mask"][:, 0].to(torch.long),
        num_tiles=[int(t[0]) for t in out["num_tiles"]],
    )


def document_image_spans(ids: np.ndarray, docs: Sequence[int], image_token_id: int) -> list[tuple[int, int]]:
    """[start, end) token span per image, in order of appearance, following Meta's `create_vision_mask`
    within each document (an image is visible from its `<|image|>` to the next image token; consecutive image
    tokens share the span after them) except that a document's last image ends at *its own document's* end."""
    ids = np.asarray(ids)
    spans: list[tuple[int, int]] = []
    start = 0
    for length in docs:
        end = start + int(length)
        locs = [start + int(i) for i in np.flatnonzero(ids[start:end] == image_token_id)]
        doc_spans = [[a, b] for a, b in itertools.pairwise(locs)]
        if locs:
            doc_spans.append([locs[-1], end])
        last_end = end
        for span in reversed(doc_spans):
            if span[0] == span[1] - 1:  # consecutive image tokens attend to the text after the group
                span[1] = last_end
            last_end = span[1]
        spans.extend((a, b) for a, b in doc_spans)
        start = end
    return spans


def mllama_cross_attention_mask(
    ids: np.ndarray, docs: Sequence[int], image_token_id: int, num_tiles: Sequence[int], max_tiles: int,
    length: int | None = None, max_images: int | None = None,
) -> np.ndarray:
    """(length, max_images, max_tiles) int64: 1 where a token may attend to an image's valid tile."""
    spans = document_image_spans(ids, docs, image_token_id)
    if len(spans) != len(num_tiles):
        raise ValueError(f"{len(spans)} image tokens but {len(num_tiles)} images")
    length = len(ids) if length is None else length
    max_images = len(spans) if max_images is None else max_images
    mask = np.zeros((length, max_images, max_tiles), dtype=np.int64)
    for i, ((a, b), tiles) in enumerate(zip(spans, num_tiles)):
        mask[a:b, i, :tiles] = 1
    return mask


def _zeros_for_transfer(shape: tuple[int, ...]) -> torch.Tensor:
    """float32 zeros; in a DataLoader worker, allocated in shared memory so the hand-over to the main process
    does not copy it again (as torch's default_collate does). Mllama pixel batches are ~100 MB."""
    if get_worker_info() is None:
        return torch.zeros(shape)
    numel = int(np.prod(shape))
    storage = torch.UntypedStorage._new_shared(numel * 4)
    return torch.empty(0).set_(storage, 0, shape).zero_()


def batch_images(fc: Any, rows: Sequence[Any], decoded: list[list[Any]], length: int,
                 always_images: bool) -> dict[str, torch.Tensor]:
    """Image slots per row (at least one: a fully masked dummy when no row has an image and `always_images`,
    so every FSDP rank runs the vision model and cross-attention) and the per-document cross-attention mask."""
    t, tiles = int(fc.tile_size), int(fc.max_tiles)
    n_img = max(len(r.images) for r in rows)
    if n_img == 0 and not always_images:
        return {}
    slots = max(n_img, 1)
    b = len(rows)
    pixel_values = _zeros_for_transfer((b, slots, tiles, 3, t, t))
    aspect_ratio_ids = torch.zeros(b, slots, dtype=torch.long)
    aspect_ratio_mask = torch.zeros(b, slots, tiles, dtype=torch.long)
    aspect_ratio_mask[:, :, 0] = 1  # empty slots: one "valid" tile, as transformers' processor pads
    xmask = np.zeros((b, length, slots, tiles), dtype=np.int64)
    for i, (row, imgs) in enumerate(zip(rows, decoded)):
        if not imgs:
            continue
        proc = mllama_images(imgs, t, tiles)
        k = len(imgs)
        pixel_values[i, :k] = proc.pixel_values
        aspect_ratio_ids[i, :k] = proc.aspect_ratio_ids
        aspect_ratio_mask[i, :k] = proc.aspect_ratio_mask
        xmask[i] = mllama_cross_attention_mask(row.ids, row.docs, fc.image_token_id, proc.num_tiles, tiles,
                                               length=length, max_images=slots)
    return {
        "pixel_values": pixel_values,
        "aspect_ratio_ids": aspect_ratio_ids,
        "aspect_ratio_mask": aspect_ratio_mask,
        "cross_attention_mask": torch.from_numpy(xmask),
    }


def eval_cross_mask(ids: torch.Tensor, image_token_id: int, num_tiles: Sequence[int], max_tiles: int) -> torch.Tensor:
    """(batch, seq, 1, max_tiles): tokens from the image token on see the image's valid tiles."""
    b, n = ids.shape
    mask = torch.zeros(b, n, 1, max_tiles, dtype=torch.long)
    for i in range(b):
        pos = (ids[i] == image_token_id).nonzero()
        if len(pos):
            mask[i, int(pos[0]):, 0, : int(num_tiles[i])] = 1
    return mask


def eval_inputs(ids: torch.Tensor, images: list[Any], geometry: ModelGeometry) -> dict[str, torch.Tensor]:
    """One image per prompt, tiled as the training loader tiles it, with its cross-attention mask."""
    mi = mllama_images(images, geometry.image_size, geometry.max_tiles)
    return {
        "pixel_values": mi.pixel_values[:, None],  # (batch, 1 image, tiles, 3, T, T)
        "aspect_ratio_ids": mi.aspect_ratio_ids[:, None],
        "aspect_ratio_mask": mi.aspect_ratio_mask[:, None],
        "cross_attention_mask": eval_cross_mask(ids, geometry.image_token_id, mi.num_tiles, geometry.max_tiles),
    }
