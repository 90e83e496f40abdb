"""Llama-3.2-Vision (Mllama) token accounting (torch-free): one `<|image|>` per image in the text; the image is
seen as tiles via cross-attention, tiled exactly as transformers' MllamaImageProcessor tiles it."""
from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

from mlan.families.base import Family, VisionGeometry
from mlan.families.local_config import load_local_config, vision_config
from mlan.families.mllama import tiny

if TYPE_CHECKING:
    from mlan.recipe import ModelSpec

# Real default: Llama-3.2-11B-Vision.
MLLAMA_TILE, MLLAMA_PATCH, MLLAMA_MAX_TILES = 560, 14, 4


def supported_aspect_ratios(max_tiles: int) -> list[tuple[int, int]]:
    """Tile grids with at most max_tiles tiles, in MllamaImageProcessor's order."""
    return [(w, h) for w in range(1, max_tiles + 1) for h in range(1, max_tiles + 1) if w * h <= max_tiles]


@lru_cache(maxsize=65536)
def tile_grid(width: int, height: int, max_tiles: int, tile_size: int) -> tuple[int, int]:
    """(rows, cols) of tiles, chosen exactly as transformers' `get_optimal_tiled_canvas` chooses the canvas.

    The smallest upscale ≥ 1 over all canvases, else the largest downscale; ties go to the smallest canvas
    area (first in order). Scales are float64 divisions, as numpy computes them there.
    """
    best: tuple[float, int, tuple[int, int]] | None = None
    scales = []
    for a, b in supported_aspect_ratios(max_tiles):
        canvas_h, canvas_w = a * tile_size, b * tile_size  # the processor reads each pair as (height, width)
        scale_h, scale_w = canvas_h / height, canvas_w / width
        scales.append((min(scale_w, scale_h), canvas_h, canvas_w))
    ups = [s for s, _, _ in scales if s >= 1]
    selected = min(ups) if ups else max(s for s, _, _ in scales if s < 1)
    for s, canvas_h, canvas_w in scales:
        if s == selected and (best is None or canvas_h * canvas_w < best[1]):
            best = (s, canvas_h * canvas_w, (canvas_h // tile_size, canvas_w // tile_size))
    assert best is not None
    return best[2]


def mllama_geometry(model: ModelSpec) -> VisionGeometry:
    """Sizes from the tiny config, else the model's config when readable, else the real defaults.

    Explicit recipe keys (`model.image_size`, `model.max_tiles`) always win.
    """
    size, patch, tiles, vocab = MLLAMA_TILE, MLLAMA_PATCH, MLLAMA_MAX_TILES, None
    if model.config == "tiny":
        size, patch = tiny.TINY_MLLAMA_TILE, tiny.TINY_MLLAMA_PATCH
        tiles = tiny.TINY_MLLAMA_MAX_TILES  # the vocabulary: the tokenizer's (MllamaFamily.vocab_size)
    else:
        cfg = load_local_config(model.config)
        if cfg is not None:
            vision = vision_config(cfg)
            size, patch = int(vision.image_size), int(vision.patch_size)
            tiles = int(getattr(vision, "max_num_tiles", tiles))
            vocab = getattr(getattr(cfg, "text_config", None), "vocab_size", None)
    explicit = model.model_fields_set
    if "image_size" in explicit and model.image_size is not None:
        size = model.image_size
    if "max_tiles" in explicit:
        tiles = model.max_tiles
    return VisionGeometry(image_size=size, patch_size=patch, image_tokens=1, max_tiles=tiles, vocab_size=vocab)


class MllamaFamily(Family):
    """Mllama: one in-sequence token per image, up to `max_tiles` tiles per image in the vision encoder."""

    name = "mllama"
    default_template = "llama3"

    def image_seq_tokens(self) -> int:
        return 1

    def tiles_for(self, width: int, height: int) -> int:
        rows, cols = tile_grid(int(width), int(height), self.geometry.max_tiles, self.geometry.image_size)
        return rows * cols

    def vision_tokens_for(self, width: int, height: int) -> int:
        per_tile = (self.geometry.image_size // self.geometry.patch_size) ** 2 + 1  # + CLS: 1601 at 560/14
        return self.tiles_for(width, height) * per_tile

    def vocab_size(self) -> int:
        """Mllama's lm_head has no row for `<|image|>` (128256): it is always masked out of the labels."""
        if self.geometry.vocab_size is not None:
            return self.geometry.vocab_size
        n = len(self.tokenizer)
        return n - 1 if self.image_token is not None and self.image_token_id == n - 1 else n

    def tile_size(self) -> int:
        return self.geometry.image_size

    def stored_image_size(self, width: int, height: int) -> tuple[int, int]:
        """Fit inside the largest tile canvas, keeping the aspect ratio (never upscaled)."""
        scale = min(1.0, self.geometry.image_size * self.geometry.max_tiles / max(width, height))
        return max(1, round(width * scale)), max(1, round(height * scale))
