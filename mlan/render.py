"""Conversation → token ids, exact loss mask, image slots and the token counts of design.md.

(Contract stub written by the lead; the rendering itself is built in mlan/render.py by the foundation work.)
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


class DocumentDropped(Exception):
    """A valid record that the overlong policy (`mixture.overlong: drop`) leaves out; counted, not rejected."""


@dataclass
class Document:
    """One tokenized document (a cache row). Counts follow design.md's token accounting."""

    doc_id: str  # stable: source name + record index + content hash
    source: str
    modality: str  # "text" | "image_text"
    input_ids: np.ndarray  # uint32 (n_tokens,)
    loss_mask: np.ndarray  # uint8 (n_tokens,): 1 on assistant content + its end-of-turn token
    image_positions: list[int] = field(default_factory=list)  # index of each image's first token
    images: list[bytes] = field(default_factory=list)  # encoded image bytes, in order of appearance
    image_exts: list[str] = field(default_factory=list)  # "jpg", "png", …
    image_sizes: list[tuple[int, int]] = field(default_factory=list)  # (width, height) per image
    n_image_tokens: int = 0  # in-sequence image positions (llava: N per image; mllama: 1 per image)
    n_tiles: int = 0  # mllama: tiles over all images; llava: images
    n_vision_tokens: int = 0  # encoder-side positions, reported, never budgeted
    truncated: bool = False

    @property
    def n_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def n_loss_tokens(self) -> int:
        return int(self.loss_mask.sum())

    @property
    def n_images(self) -> int:
        return len(self.images)
