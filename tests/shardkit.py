"""Test helpers: documents, packed rows and a build directory written to the build-output contract.

Shards are written with `mlan.mixture.shards.row_to_sample` and `webdataset.TarWriter`, the manifest with
the keys of design.md, so the loader is tested against the format, not against the build's code.
"""
from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from mlan.families import tiny
from mlan.mixture.shards import PackedRow, row_to_sample

LLAVA_FC = {
    "family": "llava", "vocab_size": tiny.LLAMA3_VOCAB + 1, "image_token_id": tiny.IMAGE_TOKEN_ID,
    "image_tokens": tiny.TINY_LLAVA_IMAGE_TOKENS, "image_size": tiny.TINY_LLAVA_IMAGE_SIZE,
    "patch_size": tiny.TINY_LLAVA_PATCH, "tile_size": None, "max_tiles": None,
}
MLLAMA_FC = {
    "family": "mllama", "vocab_size": tiny.LLAMA3_VOCAB, "image_token_id": tiny.IMAGE_TOKEN_ID,
    "image_tokens": 1, "image_size": tiny.TINY_MLLAMA_TILE, "patch_size": tiny.TINY_MLLAMA_PATCH,
    "tile_size": tiny.TINY_MLLAMA_TILE, "max_tiles": tiny.TINY_MLLAMA_MAX_TILES,
}


def synthetic_photo(width: int, height: int, seed: int) -> np.ndarray:
    """A photo-like RGB array (smooth gradients + noise) for tests; JPEG-compresses realistically."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([(x / width) * 255, (y / height) * 255, ((x + y) / (width + height)) * 255], axis=-1)
    base = base * rng.uniform(0.5, 1.0, size=3) + rng.normal(0, 12, size=(height, width, 3))
    return np.clip(base, 0, 255).astype(np.uint8)


def image_bytes(seed: int, width: int = 64, height: int = 48, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(synthetic_photo(width, height, seed)).save(buf, format=fmt)
    return buf.getvalue()


@dataclass
class Doc:
    """One tokenized document as the build would hold it."""

    ids: np.ndarray
    loss: np.ndarray
    images: list[bytes] = field(default_factory=list)
    modality: str = "text"
    doc_id: str = ""


def make_doc(rng: np.random.Generator, n_text: int, image_at: tuple[int, ...] = (), image_tokens: int = 1,
             image_token_id: int = tiny.IMAGE_TOKEN_ID, image_sizes: tuple[tuple[int, int], ...] = (),
             doc_id: str = "") -> Doc:
    """`n_text` random text tokens (BOS first, a loss mask on the second half) with an image inserted before
    each text offset in `image_at` (`image_tokens` placeholders each)."""
    text = rng.integers(0, 128000, size=n_text).astype(np.uint32)
    text[0] = tiny.BOS_ID
    tloss = np.zeros(n_text, dtype=np.uint8)
    tloss[n_text // 2:] = 1
    ids, loss, images = [], [], []
    prev = 0
    for j, at in enumerate(image_at):
        ids.append(text[prev:at]); loss.append(tloss[prev:at])
        ids.append(np.full(image_tokens, image_token_id, dtype=np.uint32)); loss.append(np.zeros(image_tokens, np.uint8))
        w, h = image_sizes[j] if j < len(image_sizes) else (64, 48)
        images.append(image_bytes(int(rng.integers(1 << 30)), w, h))
        prev = at
    ids.append(text[prev:]); loss.append(tloss[prev:])
    return Doc(np.concatenate(ids), np.concatenate(loss), images, "image_text" if images else "text", doc_id)


def pack(docs: list[Doc], key: str) -> PackedRow:
    images, exts, image_docs = [], [], []
    for d_i, d in enumerate(docs):
        for img in d.images:
            images.append(img); exts.append("jpg"); image_docs.append(d_i)
    row = PackedRow(
        ids=np.concatenate([d.ids for d in docs]).astype(np.uint32),
        loss=np.concatenate([d.loss for d in docs]).astype(np.uint8),
        docs=np.array([len(d.ids) for d in docs], dtype=np.uint32),
        doc_ids=[d.doc_id or f"{key}/{i}" for i, d in enumerate(docs)],
        sources=["test"] * len(docs),
        modalities=[d.modality for d in docs],
        images=images, image_exts=exts, image_docs=image_docs, key=key,
    )
    row.check()
    return row


def random_rows(n_rows: int, seed: int, family_config: dict, max_docs: int = 3, image_every: int = 3) -> list[PackedRow]:
    """`n_rows` small packed rows; every `image_every`-th document carries an image."""
    rng = np.random.default_rng(seed)
    per = family_config["image_tokens"]
    rows, k = [], 0
    for r in range(n_rows):
        docs = []
        for _ in range(int(rng.integers(1, max_docs + 1))):
            n = int(rng.integers(6, 20))
            at = (int(rng.integers(1, n)),) if k % image_every == 0 else ()
            docs.append(make_doc(rng, n, at, image_tokens=per))
            k += 1
        rows.append(pack(docs, ""))
    return rows


def write_build(out: Path, rows: list[PackedRow], family_config: dict, seq_len: int = 128,
                rows_per_shard: int = 10, seed: int = 0) -> Path:
    """Write `rows` as a build directory (manifest.json + shards/*.tar) with keys `{shard:06d}-{row:06d}`."""
    out = Path(out)
    (out / "shards").mkdir(parents=True, exist_ok=True)
    shards, totals = [], {"rows": 0, "tokens": 0, "loss_tokens": 0, "documents": 0,
                          "tokens_by_modality": {"text": 0, "image_text": 0}}
    for s, start in enumerate(range(0, len(rows), rows_per_shard)):
        name = f"shards/shard-{s:06d}.tar"
        chunk = rows[start:start + rows_per_shard]
        by_mod = {"text": 0, "image_text": 0}
        with wds.TarWriter(str(out / name)) as sink:
            for r_i, row in enumerate(chunk):
                row.key = f"{s:06d}-{r_i:06d}"
                sink.write(row_to_sample(row))
                for length, mod in zip(row.docs, row.modalities):
                    by_mod[mod] += int(length)
        tokens = sum(len(r) for r in chunk)
        loss_tokens = sum(int(r.loss.sum()) for r in chunk)
        shards.append({
            "name": name, "sha256": hashlib.sha256((out / name).read_bytes()).hexdigest(), "rows": len(chunk),
            "tokens": tokens, "loss_tokens": loss_tokens, "tokens_by_modality": by_mod,
            "tokens_by_source": {"test": tokens},
        })
        totals["rows"] += len(chunk); totals["tokens"] += tokens; totals["loss_tokens"] += loss_tokens
        totals["documents"] += sum(len(r.docs) for r in chunk)
        for m, n in by_mod.items():
            totals["tokens_by_modality"][m] += n
    manifest = {
        "version": 1, "recipe": {}, "fingerprint": "test", "seed": seed, "seq_len": seq_len,
        "family_config": family_config, "images": {"pre_resized": False}, "totals": totals, "shards": shards,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return out
