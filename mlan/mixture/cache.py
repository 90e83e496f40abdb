"""The tokenized-document cache: Parquet parts per source, keyed by a fingerprint of everything that shapes them.

One folder per source: `<cache>/<fingerprint>/part-NNNNNN.parquet` (one row per document, record order)
with a `part-NNNNNN.json` sidecar (records read, rejected with reasons, dropped, truncated), and
`_SUCCESS` once every part is there. The fingerprint covers the source's content (file bytes, image
folder listing), its spec (format, template, image root, limit), the model spec (family, tokenizer,
template, image tokens), the render options (seq_len, overlong) and the code that renders, so any
change rebuilds and anything else (ratio, budget, weights, seed) reuses. Parts are written atomically,
so a killed tokenization resumes from the parts already written.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mlan.render import Document
from mlan.sources.records import RecordError

CACHE_VERSION = "1"
# how images are checked and measured (full decode, EXIF orientation applied to sizes and tiles): in every key
IMAGE_DECODE = "full+exif-orientation"
SUCCESS = "_SUCCESS"
META = "meta.parquet"  # META_COLUMNS of every part with (part, row): what a plan reads, in one file
# columns the planner reads (no token arrays, no image bytes)
META_COLUMNS = (
    "index", "doc_id", "modality", "n_tokens", "n_loss_tokens", "n_images", "n_image_tokens", "n_tiles",
    "n_vision_tokens", "truncated", "image_tiles",
)
# the code whose output lands in the cache: a change to any of it rebuilds
# Only the code that shapes tokenized documents: editing the trainer, the merge map or the Mllama patch
# (also under families/) must not re-tokenize every source.
_CODE_PATHS = (
    "render.py", "templates.py", "tokenizer.py", "sources",
    "families/__init__.py", "families/base.py", "families/local_config.py", "families/registry.py", "families/tiny.py",
    "families/*/__init__.py", "families/*/geometry.py",  # each family's torch-free side: registration, accounting
    "mixture/cache.py",
)


def default_cache_dir() -> str:
    return os.environ.get("MLAN_TOKENIZED_CACHE") or str(Path.home() / ".cache" / "mlan" / "tokenized")


def _fs(url: str):
    import fsspec

    return fsspec.core.url_to_fs(url)


def _hash_path(path: str, h: hashlib._Hash, with_bytes: bool) -> bool:
    """Feed a file's bytes (or a folder's listing) into `h`; False when the path is not on any filesystem."""
    try:
        fs, p = _fs(path)
        if not fs.exists(p):
            return False
    except Exception:  # noqa: BLE001 - an unknown protocol: treat as a hub id
        return False
    if fs.isdir(p):
        for name, info in sorted(fs.find(p, detail=True).items()):
            rel = name[len(p.rstrip("/")) + 1 :]
            h.update(f"{rel}\0{info.get('size')}\0{info.get('mtime', info.get('LastModified', ''))}\n".encode())
            if with_bytes and info.get("size", 0) <= (64 << 20) and rel.endswith((".json", ".jsonl", ".parquet", ".arrow", ".csv", ".txt")):
                with fs.open(name, "rb") as f:
                    while block := f.read(1 << 22):
                        h.update(block)
    else:
        with fs.open(p, "rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
    return True


def code_fingerprint() -> str:
    """sha256 over the rendering code (`_CODE_PATHS`: render, templates, tokenizer, sources, family accounting)."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for rel in _CODE_PATHS:
        for p in sorted(root.glob(rel)) if "*" in rel else [root / rel]:
            files = sorted(p.rglob("*.py")) if p.is_dir() else [p] if p.exists() else []
            for f in files:
                h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def source_fingerprint(recipe, source, tokenizer_fp: str = "", code_fp: str | None = None,
                       family_config: dict | None = None) -> str:
    """The cache key of one source under one recipe's model and render options.

    `family_config` (the resolved image geometry) is part of the key: two model sections that dump alike
    can still resolve differently (an explicit `image_tokens: 576` vs the tiny default of 16).
    """
    spec = source.model_dump(mode="json")
    for key in ("weight", "upsample"):  # mixing knobs: never change the documents
        spec.pop(key, None)
    h = hashlib.sha256()
    h.update(
        json.dumps(
            {
                "version": CACHE_VERSION,
                "source": spec,
                "model": recipe.model.model_dump(mode="json"),
                "seq_len": recipe.mixture.seq_len,
                "overlong": recipe.mixture.overlong,
                "pre_resize": recipe.shards.pre_resize,
                "family_config": family_config,
                "images": {"decode": IMAGE_DECODE, "max_pixels": recipe.mixture.max_image_pixels,
                           "max_aspect": recipe.mixture.max_image_aspect},
                "tokenizer": tokenizer_fp,
                "code": code_fp if code_fp is not None else code_fingerprint(),
            },
            sort_keys=True,
        ).encode()
    )
    h.update(b"content\0")
    if not _hash_path(source.path, h, with_bytes=True):
        h.update(f"hub:{source.path}:{source.subset}:{source.split}".encode())
    if source.images:
        h.update(b"images\0")
        _hash_path(source.images, h, with_bytes=False)
    return h.hexdigest()[:24]


def combine_fingerprints(fps: list[str]) -> str:
    return hashlib.sha256("\n".join(fps).encode()).hexdigest()[:24]


# ---------------------------------------------------------------- parts
def _list_array(arrays: list[np.ndarray], value_type: pa.DataType) -> pa.ListArray:
    sizes = np.array([a.size for a in arrays], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int32)
    np_type = value_type.to_pandas_dtype()
    values = np.concatenate(arrays).astype(np_type) if arrays else np.zeros(0, np_type)
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, value_type))


def docs_to_table(docs: list[Document], indices: list[int], files: list[str] | None = None) -> pa.Table:
    """Documents as one Arrow table (design.md's cache row), in the given order; `files`: each one's input file
    (so a document rejected later, at plan time, is still listed with its file)."""
    return pa.table(
        {
            "index": pa.array(indices, pa.int64()),
            "file": pa.array(files if files is not None else [""] * len(docs), pa.string()).dictionary_encode(),
            "doc_id": pa.array([d.doc_id for d in docs], pa.string()),
            "source": pa.array([d.source for d in docs], pa.string()),
            "modality": pa.array([d.modality for d in docs], pa.string()),
            "input_ids": _list_array([np.asarray(d.input_ids, np.uint32) for d in docs], pa.uint32()),
            "loss_mask": _list_array([np.asarray(d.loss_mask, np.uint8) for d in docs], pa.uint8()),
            "image_positions": pa.array([list(map(int, d.image_positions)) for d in docs], pa.list_(pa.int64())),
            "images": pa.array([list(d.images) for d in docs], pa.list_(pa.binary())),
            "image_exts": pa.array([list(d.image_exts) for d in docs], pa.list_(pa.string())),
            "image_sizes": pa.array(
                [[list(map(int, s)) for s in d.image_sizes] for d in docs], pa.list_(pa.list_(pa.int64()))
            ),
            "n_tokens": pa.array([d.n_tokens for d in docs], pa.int64()),
            "n_loss_tokens": pa.array([d.n_loss_tokens for d in docs], pa.int64()),
            "n_images": pa.array([d.n_images for d in docs], pa.int64()),
            "n_image_tokens": pa.array([d.n_image_tokens for d in docs], pa.int64()),
            "n_tiles": pa.array([d.n_tiles for d in docs], pa.int64()),
            "n_vision_tokens": pa.array([d.n_vision_tokens for d in docs], pa.int64()),
            "truncated": pa.array([bool(d.truncated) for d in docs], pa.bool_()),
            "image_tiles": pa.array([list(map(int, getattr(d, "image_tiles", []))) for d in docs], pa.list_(pa.int64())),
        }
    )


@dataclass
class PartSummary:
    """What tokenizing one batch of records produced, besides the documents."""

    part: int
    read: int
    accepted: int
    rejected: list[dict]  # {source, index, file, field, reason, kind: "rejected", stage: "read" | "render"}
    dropped: list[dict]  # same keys, kind "dropped": valid records left out by the overlong policy
    truncated: int
    tokens: int
    notes: dict[str, int] = field(default_factory=dict)  # what conversion changed ("stripped end marker": n)

    def to_json(self) -> dict:
        return dict(self.__dict__)


def part_paths(cache: str, part: int) -> tuple[str, str]:
    base = f"{cache.rstrip('/')}/part-{part:06d}"
    return base + ".parquet", base + ".json"


def write_part(cache: str, part: int, docs: list[Document], indices: list[int], summary: PartSummary,
               files: list[str] | None = None) -> pa.Table:
    """Parquet then sidecar, each via a temporary name: the sidecar's presence means the part is complete.

    Returns the part's META_COLUMNS, so the driver can write the cache's meta file without re-reading parts.
    """
    fs, root = _fs(cache)
    fs.makedirs(root, exist_ok=True)
    pq_url, js_url = part_paths(root, part)
    table = docs_to_table(docs, indices, files)
    with fs.open(pq_url + ".tmp", "wb") as f:
        pq.write_table(table, f, compression="zstd")
    fs.mv(pq_url + ".tmp", pq_url)
    with fs.open(js_url + ".tmp", "w") as f:
        json.dump(summary.to_json(), f)
    fs.mv(js_url + ".tmp", js_url)
    return table.select(list(META_COLUMNS))


def read_part_summary(cache: str, part: int) -> PartSummary | None:
    fs, root = _fs(cache)
    _, js_url = part_paths(root, part)
    if not fs.exists(js_url):
        return None
    with fs.open(js_url, "r") as f:
        return PartSummary(**json.load(f))


def mark_complete(cache: str, n_parts: int, info: dict) -> None:
    fs, root = _fs(cache)
    with fs.open(f"{root}/{SUCCESS}", "w") as f:
        json.dump({"parts": n_parts, **info}, f)


def read_complete(cache: str) -> dict | None:
    """The cache's completion record, or None when it was never finished."""
    fs, root = _fs(cache)
    path = f"{root}/{SUCCESS}"
    if not fs.exists(path):
        return None
    with fs.open(path, "r") as f:
        return json.load(f)


def _part_meta(root: str, fs, part: int, meta: pa.Table | None = None) -> pa.Table:
    if meta is None:
        with fs.open(part_paths(root, part)[0], "rb") as f:
            meta = pq.read_table(f, columns=list(META_COLUMNS))
    meta = meta.append_column("part", pa.array(np.full(meta.num_rows, part, np.int64)))
    return meta.append_column("row", pa.array(np.arange(meta.num_rows, dtype=np.int64)))


def _meta_of_parts(root: str, fs, n_parts: int, known: dict[int, pa.Table] | None = None) -> pa.Table:
    """Every part's META_COLUMNS with (part, row), in part order: from `known` where given, else read."""
    known = known or {}
    tables = [_part_meta(root, fs, p, known.get(p)) for p in range(n_parts)]
    return pa.concat_tables(tables) if tables else pa.table({c: [] for c in (*META_COLUMNS, "part", "row")})


def write_meta(cache: str, n_parts: int, known: dict[int, pa.Table] | None = None) -> None:
    """The cache's meta file: every part's META_COLUMNS (from `known`, else read from the part) in one table."""
    fs, root = _fs(cache)
    path = f"{root}/{META}"
    with fs.open(path + ".tmp", "wb") as f:
        pq.write_table(_meta_of_parts(root, fs, n_parts, known), f)
    fs.mv(path + ".tmp", path)


def read_meta(cache: str, n_parts: int) -> pa.Table:
    """Per-document counts of a whole source (record order), with each document's part and row in it.

    One read of the meta file; a cache finished before meta files existed is read part by part.
    """
    fs, root = _fs(cache)
    if fs.exists(f"{root}/{META}"):
        with fs.open(f"{root}/{META}", "rb") as f:
            return pq.read_table(f)
    return _meta_of_parts(root, fs, n_parts)


def read_part(cache: str, part: int) -> pa.Table:
    fs, root = _fs(cache)
    with fs.open(part_paths(root, part)[0], "rb") as f:
        return pq.read_table(f)


_MEMORY_ADDRESS = re.compile(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>")


def rejected_entry(source: str, err: RecordError, index: int | None = None, stage: str = "read",
                   kind: str = "rejected") -> dict:
    """A rejected.jsonl line: source, record index (the source's numbering), file, field, reason, and which
    `kind` (rejected: bad input; dropped: valid but left out) at which `stage` (read, render, plan)."""
    entry = {"source": source, **err.to_json(), "kind": kind, "stage": stage}
    entry["reason"] = _MEMORY_ADDRESS.sub("", entry["reason"])  # an object's repr says nothing to a user
    if index is not None:
        entry["index"] = index
    return entry


def doc_files(cache: str, part: int, rows: list[int]) -> list[str]:
    """The input file of some documents of a part (read from its `file` column only)."""
    fs, root = _fs(cache)
    with fs.open(part_paths(root, part)[0], "rb") as f:
        column = pq.read_table(f, columns=["file"]).column("file").to_pylist()
    return [column[r] for r in rows]
