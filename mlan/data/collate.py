"""Packed rows → the model's own forward arguments, per family, with exact per-document isolation.

Every batch holds `input_ids`, `labels` (aligned with `input_ids`; the model shifts), `position_ids`
(restarting at 0 for every document, and for the padding tail), images per family, and `meta`
(token counts the trainer budgets with; popped before the forward call).

Isolation rests on three things, each tested in tests/data/test_isolation.py:
- self-attention: from `position_ids` alone (no `attention_mask`, `use_cache=False`): with
  `train.attention: documents` (default) each document attends causally within itself
  (`mlan.train.attention`); with `sdpa`, transformers builds the equivalent block-diagonal mask;
- labels: a document's first token is never a target (−100), so the last token of one document is
  never trained to predict the first token of the next;
- mllama cross-attention: `mlan.families.mllama.inputs.mllama_cross_attention_mask` ends each image's span
  at its own document's end, and the model carries Meta's output row mask (`mlan.families.mllama.patch`).
The images of a batch are the family's (`FamilyRuntime.batch_images`): nothing here names a family.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mlan.data.images import decode_image
from mlan.data.labels import IGNORE_INDEX
from mlan.families.base import ModelGeometry
from mlan.families.registry import family_names, family_plugin
from mlan.mixture.shards import PackedRow

PAD_TO = ("longest", "seq_len")


NO_IMAGE_TOKEN = -1  # the image token id of a text-only build (no tokenizer id matches it)


def checked_geometry(family_config: ModelGeometry | Mapping[str, Any]) -> ModelGeometry:
    """A manifest's `family_config` (or a geometry) checked for the collator: its family registered, and
    the keys that family needs present (ValueError naming `family_config.<key>`)."""
    geometry = (family_config if isinstance(family_config, ModelGeometry)
                else ModelGeometry.from_manifest(family_config))
    if geometry.family not in family_names():
        expected = " or ".join(repr(name) for name in family_names())
        raise ValueError(f"family_config.family: expected {expected}, got {geometry.family!r}")
    family_plugin(geometry.family).check_config(geometry.to_manifest())
    return geometry


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
    labels = np.where(np.asarray(loss) > 0, np.asarray(ids, dtype=np.int64), IGNORE_INDEX)
    labels[np.asarray(ids) == image_token_id] = IGNORE_INDEX
    starts = np.cumsum(docs) - np.asarray(docs)
    labels[starts[np.asarray(docs) > 0]] = IGNORE_INDEX
    return labels


def _image_token_id(geometry: ModelGeometry) -> int:
    return NO_IMAGE_TOKEN if geometry.image_token_id is None else geometry.image_token_id


def check_row_images(row: PackedRow, geometry: ModelGeometry) -> None:
    """Image tokens, images and image_docs agree; raises ValueError naming the row."""
    n_tok = int((np.asarray(row.ids) == _image_token_id(geometry)).sum())
    per = family_plugin(geometry.family).placeholders_per_image(geometry.image_tokens)
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

    geometry: ModelGeometry
    seq_len: int | None = None
    pad_to: str = "longest"
    always_images: bool = True  # image slots even when no row has an image, where the family needs them (FSDP)
    pad_token_id: int = 0  # any id the embedding has; padding is never attended to by real tokens

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
        geometry = self.geometry
        longest = max(len(r) for r in rows)
        length = self.seq_len if self.pad_to == "seq_len" else longest
        if longest > length:
            raise ValueError(f"row of {longest} tokens does not fit pad_to seq_len={length}")
        b = len(rows)
        input_ids = np.full((b, length), self.pad_token_id, dtype=np.int64)
        labels = np.full((b, length), IGNORE_INDEX, dtype=np.int64)
        position_ids = np.zeros((b, length), dtype=np.int64)
        by_modality = {"text": 0, "image_text": 0}
        n_tokens = 0
        for i, (row, fill) in enumerate(zip(rows, filler)):
            row.check()
            check_row_images(row, geometry)
            n = len(row)
            input_ids[i, :n] = row.ids
            position_ids[i, :n] = document_position_ids(row.docs)
            position_ids[i, n:] = np.arange(length - n)  # the padding tail is a document of its own
            if not fill:
                labels[i, :n] = row_labels(row.ids, row.loss, row.docs, _image_token_id(geometry))
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
        runtime = family_plugin(geometry.family).runtime()
        batch.update(runtime.batch_images(geometry, rows, decoded, length, self.always_images))
        batch["meta"] = {
            "n_tokens": n_tokens,
            "n_loss_tokens": int((labels != IGNORE_INDEX).sum()),
            "tokens_by_modality": by_modality,
            "keys": [r.key for r, fill in zip(rows, filler) if not fill],
            "n_images": sum(len(r.images) for r, fill in zip(rows, filler) if not fill),
            "filler_rows": sum(filler),
            "row_tokens": [0 if fill else len(r) for r, fill in zip(rows, filler)],  # per row, for budget cuts
        }
        return batch


def family_collate(family_config: ModelGeometry | Mapping[str, Any], seq_len: int | None = None,
                   pad_to: str = "longest", always_images: bool = True) -> Callable[..., dict[str, Any]]:
    """The collator for a build's geometry (or its manifest `family_config`): `collate(rows, filler=None) -> batch`."""
    return FamilyCollator(checked_geometry(family_config), seq_len=seq_len, pad_to=pad_to, always_images=always_images)
