"""Packed rows → the model's own forward arguments, per family, with exact per-document isolation.

Every batch holds `input_ids`, `labels` (aligned with `input_ids`; the model shifts), `position_ids`
(restarting at 0 for every document, and for the padding tail), images per family, and `meta`
(token counts the trainer budgets with; popped before the forward call).

Isolation rests on three things, each tested in tests/test_isolation.py:
- self-attention: from `position_ids` alone (no `attention_mask`, `use_cache=False`): with
  `train.attention: documents` (default) each document attends causally within itself
  (`mlan.train.attention`); with `sdpa`, transformers builds the equivalent block-diagonal mask;
- labels: a document's first token is never a target (−100), so the last token of one document is
  never trained to predict the first token of the next;
- mllama cross-attention: `mllama_cross_attention_mask` ends each image's span at its own document's
  end, and the model carries Meta's output row mask (`mlan.families.mllama_patch`).
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import get_worker_info

from mlan.data.images import decode_image, llava_pixel_values, mllama_images
from mlan.mixture.shards import PackedRow

IGNORE = -100
PAD_TO = ("longest", "seq_len")


@dataclass(frozen=True)
class FamilyConfig:
    """The manifest's `family_config`: what the collator needs to know about the model family."""

    family: str  # "llava" | "mllama"
    vocab_size: int
    image_token_id: int
    image_tokens: int = 1  # in-sequence placeholders per image (llava: N, mllama: 1)
    image_size: int | None = None  # llava: vision input side
    patch_size: int | None = None
    tile_size: int | None = None  # mllama: tile side (560 for the real model)
    max_tiles: int = 4  # mllama
    pad_token_id: int = 0  # any id the embedding has; padding is never attended to by real tokens

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FamilyConfig:
        """Build from a manifest dict; unknown keys are ignored, missing required ones named."""
        fam = d.get("family")
        if fam not in ("llava", "mllama"):
            raise ValueError(f"family_config.family: expected 'llava' or 'mllama', got {fam!r}")
        if d.get("vocab_size") is None:
            raise ValueError("family_config.vocab_size: missing")
        if fam == "mllama" and d.get("image_token_id") is None:
            raise ValueError("family_config.image_token_id: missing (mllama needs the <|image|> id)")
        if fam == "mllama" and not d.get("tile_size"):
            raise ValueError("family_config.tile_size: missing (mllama needs the tile side)")
        fields = {k: d[k] for k in cls.__dataclass_fields__ if d.get(k) is not None}
        fields.setdefault("image_token_id", -1)  # a text-only llava build: no id can match
        return cls(**fields)


# ---------------------------------------------------------------- per-row pieces
def document_position_ids(docs: Sequence[int]) -> np.ndarray:
    """0..len-1 for each document in turn: the positions each document has when run alone."""
    docs = np.asarray(docs, dtype=np.int64)
    if docs.size == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.repeat(np.cumsum(docs) - docs, docs)
    return np.arange(int(docs.sum()), dtype=np.int64) - starts


def row_labels(ids: np.ndarray, loss: np.ndarray, docs: Sequence[int], image_token_id: int) -> np.ndarray:
    """Token ids where the loss mask is set, −100 elsewhere, on image tokens and on every document's first token."""
    labels = np.where(np.asarray(loss) > 0, np.asarray(ids, dtype=np.int64), IGNORE)
    labels[np.asarray(ids) == image_token_id] = IGNORE
    starts = np.cumsum(docs) - np.asarray(docs)
    labels[starts[np.asarray(docs) > 0]] = IGNORE
    return labels


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


def check_row_images(row: PackedRow, fc: FamilyConfig) -> None:
    """Image tokens, images and image_docs agree; raises ValueError naming the row."""
    n_tok = int((np.asarray(row.ids) == fc.image_token_id).sum())
    per = fc.image_tokens if fc.family == "llava" else 1
    if n_tok != per * len(row.images):
        raise ValueError(f"row {row.key!r}: {n_tok} image tokens for {len(row.images)} images "
                         f"({per} per image expected)")
    if len(row.image_docs) != len(row.images):
        raise ValueError(f"row {row.key!r}: image_docs has {len(row.image_docs)} entries for {len(row.images)} images")


def decode_row_images(row: PackedRow, origin: str = "") -> list:
    """Decoded images of a row; a failure names the origin (the shard), the row key and the image."""
    prefix = f"{origin}: " if origin else ""
    return [decode_image(data, f"{prefix}row {row.key!r}: img{i}.{ext}")
            for i, (data, ext) in enumerate(zip(row.images, row.image_exts))]


# ---------------------------------------------------------------- batches
@dataclass(frozen=True)
class FamilyCollator:
    """Callable: a list of packed rows → one batch (forward arguments + `meta`)."""

    fc: FamilyConfig
    seq_len: int | None = None
    pad_to: str = "longest"
    always_images: bool = True  # mllama: a fully masked dummy image when no row has one (FSDP: same modules)

    def __post_init__(self):
        if self.pad_to not in PAD_TO:
            raise ValueError(f"pad_to: expected one of {PAD_TO}, got {self.pad_to!r}")
        if self.pad_to == "seq_len" and not self.seq_len:
            raise ValueError("pad_to='seq_len' needs seq_len")

    def __call__(self, rows: list[PackedRow], filler: Sequence[bool] | None = None,
                 origins: Sequence[str] | None = None) -> dict[str, Any]:
        """`filler[i]` marks a row dealt only so that every rank runs the same number of batches (no loss, not
        counted); `origins[i]` names where row i came from (its shard) in error messages."""
        if not rows:
            raise ValueError("cannot collate an empty list of rows")
        filler = list(filler) if filler is not None else [False] * len(rows)
        fc = self.fc
        longest = max(len(r) for r in rows)
        length = self.seq_len if self.pad_to == "seq_len" else longest
        if longest > length:
            raise ValueError(f"row of {longest} tokens does not fit pad_to seq_len={length}")
        b = len(rows)
        input_ids = np.full((b, length), fc.pad_token_id, dtype=np.int64)
        labels = np.full((b, length), IGNORE, dtype=np.int64)
        position_ids = np.zeros((b, length), dtype=np.int64)
        by_modality = {"text": 0, "image_text": 0}
        n_tokens = 0
        for i, (row, fill) in enumerate(zip(rows, filler)):
            row.check()
            check_row_images(row, fc)
            n = len(row)
            input_ids[i, :n] = row.ids
            position_ids[i, :n] = document_position_ids(row.docs)
            position_ids[i, n:] = np.arange(length - n)  # the padding tail is a document of its own
            if not fill:
                labels[i, :n] = row_labels(row.ids, row.loss, row.docs, fc.image_token_id)
                n_tokens += n
                for length_d, mod in zip(row.docs, row.modalities):
                    by_modality[mod] = by_modality.get(mod, 0) + int(length_d)
        batch: dict[str, Any] = {
            "input_ids": torch.from_numpy(input_ids),
            "labels": torch.from_numpy(labels),
            "position_ids": torch.from_numpy(position_ids),
        }
        origins = list(origins) if origins is not None else [""] * len(rows)
        decoded = [decode_row_images(r, o) for r, o in zip(rows, origins)]
        if fc.family == "llava":
            batch.update(self._llava(decoded))
        else:
            batch.update(self._mllama(rows, decoded, length))
        batch["meta"] = {
            "n_tokens": n_tokens,
            "n_loss_tokens": int((labels != IGNORE).sum()),
            "tokens_by_modality": by_modality,
            "keys": [r.key for r, fill in zip(rows, filler) if not fill],
            "n_images": sum(len(r.images) for r, fill in zip(rows, filler) if not fill),
            "filler_rows": sum(filler),
            "row_tokens": [0 if fill else len(r) for r, fill in zip(rows, filler)],  # per row, for budget cuts
        }
        return batch

    def _llava(self, decoded: list[list]) -> dict[str, torch.Tensor]:
        images = [img for row in decoded for img in row]
        if not images:
            return {}
        if not self.fc.image_size:
            raise ValueError("family_config.image_size: missing, and the build has images (llava needs the side)")
        return {"pixel_values": llava_pixel_values(images, int(self.fc.image_size))}

    def _mllama(self, rows: list[PackedRow], decoded: list[list], length: int) -> dict[str, torch.Tensor]:
        fc = self.fc
        t, tiles = int(fc.tile_size), int(fc.max_tiles)
        n_img = max(len(r.images) for r in rows)
        if n_img == 0 and not self.always_images:
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


def _zeros_for_transfer(shape: tuple[int, ...]) -> torch.Tensor:
    """float32 zeros; in a DataLoader worker, allocated in shared memory so the hand-over to the main process
    does not copy it again (as torch's default_collate does). Mllama pixel batches are ~100 MB."""
    if get_worker_info() is None:
        return torch.zeros(shape)
    numel = int(np.prod(shape))
    storage = torch.UntypedStorage._new_shared(numel * 4)
    return torch.empty(0).set_(storage, 0, shape).zero_()


def family_collate(family_config: FamilyConfig | dict[str, Any], seq_len: int | None = None,
                   pad_to: str = "longest", always_images: bool = True) -> Callable[..., dict[str, Any]]:
    """The collator for a build's family: `collate(rows, filler=None) -> batch`."""
    fc = family_config if isinstance(family_config, FamilyConfig) else FamilyConfig.from_dict(family_config)
    return FamilyCollator(fc, seq_len=seq_len, pad_to=pad_to, always_images=always_images)
