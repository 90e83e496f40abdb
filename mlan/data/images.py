"""Image decoding and per-family processing, run inside DataLoader workers.

llava: CLIP-style resize (shortest edge) + center crop to `image_size` + CLIP normalisation → (3, S, S).
mllama: `MllamaImageProcessor` tiling to ≤ `max_tiles` tiles of `tile_size` → pixel_values (max_tiles, 3, T, T),
aspect_ratio_id, aspect_ratio_mask (max_tiles,), number of valid tiles.
Processors are built from the manifest's `family_config` values, never fetched from the hub. The PIL
backends are used: they need no torchvision and give the same numbers on every machine.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

import torch
from PIL import Image, UnidentifiedImageError

from mlan.errors import MlanError
from mlan.sources.images import open_oriented

# CLIP's normalisation constants (openai/clip-vit-large-patch14-336 preprocessor_config.json)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ImageDecodeError(MlanError, ValueError):
    """An image in a packed row that PIL cannot decode; the message names the row key and the image."""


def decode_image(data: bytes, where: str) -> Image.Image:
    """Encoded bytes → an RGB PIL image, EXIF orientation applied, by the build's own decode (so the tile
    counts and sizes the build recorded are those of this image); `where` names the row and image."""
    try:
        return open_oriented(data)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        reason = re.sub(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>", "", str(err))
        raise ImageDecodeError(f"{where}: cannot decode image ({type(err).__name__}: {reason})") from err


@lru_cache(maxsize=8)
def _clip_processor(image_size: int):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

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


@lru_cache(maxsize=8)
def _mllama_processor(tile_size: int, max_tiles: int):
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    return MllamaImageProcessorPil(size={"height": tile_size, "width": tile_size}, max_image_tiles=max_tiles)


def llava_pixel_values(images: list[Image.Image], image_size: int) -> torch.Tensor:
    """(n, 3, S, S) float32 for n decoded images, in the given order."""
    if not images:
        return torch.zeros(0, 3, image_size, image_size)
    out = _clip_processor(image_size)(images=images, return_tensors="pt")
    return out["pixel_values"].to(torch.float32)


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
