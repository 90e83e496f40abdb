"""The packed-row format: one WebDataset sample = one packed row (design.md, "Packed row").

`<key>.ids.npy` uint32 token ids, `<key>.loss.npy` uint8 loss mask, `<key>.docs.npy` uint32 document
lengths summing to the row length, `<key>.img{i}.<ext>` encoded images in order of appearance, and
`<key>.json` with per-document lists (doc_ids, sources, modalities) and image_docs (each image's doc).
Padding is never stored; the collator pads.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass, field

import numpy as np


@dataclass
class PackedRow:
    ids: np.ndarray  # uint32 (L,)
    loss: np.ndarray  # uint8 (L,)
    docs: np.ndarray  # uint32 (n_docs,), sums to L
    doc_ids: list[str]
    sources: list[str]
    modalities: list[str]
    images: list[bytes] = field(default_factory=list)  # encoded, in order of appearance
    image_exts: list[str] = field(default_factory=list)
    image_docs: list[int] = field(default_factory=list)  # for each image, the index of its document
    key: str = ""

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def check(self) -> None:
        """The row's invariants; raises ValueError naming the row on violation."""
        n = len(self)
        problems = []
        if self.loss.shape != (n,):
            problems.append(f"loss mask length {self.loss.shape} != {n}")
        if int(self.docs.sum()) != n:
            problems.append(f"document lengths sum to {int(self.docs.sum())}, row has {n} tokens")
        if not (len(self.doc_ids) == len(self.sources) == len(self.modalities) == len(self.docs)):
            problems.append("per-document lists differ in length")
        if not (len(self.images) == len(self.image_exts) == len(self.image_docs)):
            problems.append("image lists differ in length")
        if problems:
            raise ValueError(f"packed row {self.key!r}: " + "; ".join(problems))


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _from_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def row_to_sample(row: PackedRow) -> dict[str, bytes | str]:
    """A WebDataset sample dict (`__key__` plus extension → bytes), deterministic byte for byte."""
    sample: dict[str, bytes | str] = {
        "__key__": row.key,
        "ids.npy": _npy(np.ascontiguousarray(row.ids, dtype=np.uint32)),
        "loss.npy": _npy(np.ascontiguousarray(row.loss, dtype=np.uint8)),
        "docs.npy": _npy(np.ascontiguousarray(row.docs, dtype=np.uint32)),
        "json": json.dumps(
            {
                "doc_ids": row.doc_ids,
                "sources": row.sources,
                "modalities": row.modalities,
                "image_docs": [int(d) for d in row.image_docs],
            },
            sort_keys=True,
        ).encode(),
    }
    for i, (data, ext) in enumerate(zip(row.images, row.image_exts)):
        sample[f"img{i}.{ext}"] = data
    return sample


def sample_to_row(sample: dict) -> PackedRow:
    """Inverse of `row_to_sample`; accepts the raw dict webdataset yields (bytes values)."""
    meta = json.loads(sample["json"])
    images, exts = [], []
    img_keys = sorted(
        (k for k in sample if k.startswith("img") and "." in k),
        key=lambda k: int(k.split(".", 1)[0][3:]),
    )
    for k in img_keys:
        images.append(sample[k])
        exts.append(k.split(".", 1)[1])
    return PackedRow(
        ids=_from_npy(sample["ids.npy"]),
        loss=_from_npy(sample["loss.npy"]),
        docs=_from_npy(sample["docs.npy"]),
        doc_ids=meta["doc_ids"],
        sources=meta["sources"],
        modalities=meta["modalities"],
        images=images,
        image_exts=exts,
        image_docs=meta["image_docs"],
        key=sample.get("__key__", ""),
    )
