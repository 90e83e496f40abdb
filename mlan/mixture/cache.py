"""The tokenized-document cache: Parquet parts per source, keyed by a fingerprint of everything that shapes them.

One folder per source: `<cache>/<key>/part-NNNNNN.parquet` (one row per document, record order)
with a `part-NNNNNN.json` sidecar (records read, rejected with reasons, dropped, truncated), and
`_SUCCESS` once every part is there. The key (mlan.mixture.cache_key) covers everything that shapes a
document. Parts are written atomically, so a killed tokenization resumes from the parts already written.

Several builds may share one cache: every file is written under a temporary name unique to its writer
(`_own_suffix`) and renamed into place (mlan.atomic_write), and a build holds the cache's lock (`cache_lock`) while it fills entries, so a second
build waits and then finds them complete instead of writing the same entries at the same time.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mlan.atomic_write import atomic_open
from mlan.mixture.shards import fs_of
from mlan.render import Document
from mlan.run_lock import RunLock
from mlan.sources.records import RecordError

SUCCESS = "_SUCCESS"
META = "meta.parquet"  # META_COLUMNS of every part with (part, row): what a plan reads, in one file
# columns the planner reads (no token arrays, no image bytes)
META_COLUMNS = (
    "index", "doc_id", "modality", "n_tokens", "n_loss_tokens", "n_images", "n_image_tokens", "n_tiles",
    "n_vision_tokens", "truncated", "image_tiles",
)


def _own_suffix() -> str:
    """A temporary-file suffix no other writer uses: two builds writing the same entry never share a temp file."""
    return f".{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"


def default_cache_dir() -> str:
    return os.environ.get("MLAN_TOKENIZED_CACHE") or str(Path.home() / ".cache" / "mlan" / "tokenized")


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
    fs, root = fs_of(cache)
    fs.makedirs(root, exist_ok=True)
    pq_url, js_url = part_paths(root, part)
    table = docs_to_table(docs, indices, files)
    with atomic_open(fs.unstrip_protocol(pq_url), "wb", suffix=_own_suffix()) as f:
        pq.write_table(table, f, compression="zstd")
    with atomic_open(fs.unstrip_protocol(js_url), "w", suffix=_own_suffix()) as f:
        json.dump(summary.to_json(), f)
    return table.select(list(META_COLUMNS))


def read_part_summary(cache: str, part: int) -> PartSummary | None:
    fs, root = fs_of(cache)
    _, js_url = part_paths(root, part)
    if not fs.exists(js_url):
        return None
    with fs.open(js_url, "r") as f:
        return PartSummary(**json.load(f))


def mark_complete(cache: str, n_parts: int, info: dict) -> None:
    fs, root = fs_of(cache)
    with atomic_open(fs.unstrip_protocol(f"{root}/{SUCCESS}"), "w", suffix=_own_suffix()) as f:
        json.dump({"parts": n_parts, **info}, f)


@contextlib.contextmanager
def cache_lock(cache_root: str) -> Iterator[None]:
    """Hold the cache's lock (`<cache>/.mlan.lock`, flock) while filling entries: another build using the same
    cache waits for it, then finds the entries complete. A remote (fsspec URL) cache is not lockable and relies
    on the atomic writes alone."""
    if "://" in cache_root and not cache_root.startswith("file://"):
        yield
        return
    with RunLock(Path(cache_root.removeprefix("file://")), "build", wait=True):
        yield


def read_complete(cache: str) -> dict | None:
    """The cache's completion record, or None when it was never finished."""
    fs, root = fs_of(cache)
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
    fs, root = fs_of(cache)
    path = f"{root}/{META}"
    with atomic_open(fs.unstrip_protocol(path), "wb", suffix=_own_suffix()) as f:
        pq.write_table(_meta_of_parts(root, fs, n_parts, known), f)


def read_meta(cache: str, n_parts: int) -> pa.Table:
    """Per-document counts of a whole source (record order), with each document's part and row in it.

    One read of the meta file; a cache finished before meta files existed is read part by part.
    """
    fs, root = fs_of(cache)
    if fs.exists(f"{root}/{META}"):
        with fs.open(f"{root}/{META}", "rb") as f:
            return pq.read_table(f)
    return _meta_of_parts(root, fs, n_parts)


def read_part(cache: str, part: int) -> pa.Table:
    fs, root = fs_of(cache)
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
    fs, root = fs_of(cache)
    with fs.open(part_paths(root, part)[0], "rb") as f:
        column = pq.read_table(f, columns=["file"]).column("file").to_pylist()
    return [column[r] for r in rows]
