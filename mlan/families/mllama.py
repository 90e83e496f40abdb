"""Llama-3.2-Vision (Mllama): one `<|image|>` per image in the text; the image is seen as tiles via cross-attention."""
from __future__ import annotations

from functools import lru_cache

from mlan.families.base import Family


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


class MllamaFamily(Family):
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
