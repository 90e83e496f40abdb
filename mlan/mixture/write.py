"""The write stage: the packed rows of the plan → shard tars cut from the tokenized cache, on Ray actors.

Each shard is written under a temporary name; a per-shard sidecar records its planned content and sha256,
then the tar is renamed, so a restarted build keeps every shard finished with the same plan (resume by
finished shard). The bytes depend only on the plan, never on which actor wrote what.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import ray
from ray.util import ActorPool

from mlan import progress as mlan_progress
from mlan.atomic_write import write_text_atomic
from mlan.mixture import cache as tcache
from mlan.mixture.pack import Packing
from mlan.mixture.shards import (
    PackedRow,
    fs_of,
    row_key,
    row_to_sample,
    sha256_of,
    shard_name,
    write_tar,
)

PROGRESS_DIR = ".progress"  # per-shard sidecars: planned content + sha256 (what resume trusts)


class BuildError(RuntimeError):
    """A broken build invariant (a bug, not bad input); one line saying what."""


@dataclass
class PartColumns:
    """One cache part decoded once into what rows are cut from: flat token arrays with offsets, and lists."""

    offsets: np.ndarray  # int64 (n_docs + 1,): document k is ids[offsets[k]:offsets[k + 1]]
    ids: np.ndarray  # uint32, every document of the part back to back
    loss: np.ndarray  # uint8, aligned with ids
    doc_id: list[str]
    source: list[str]
    modality: list[str]
    images: list[list[bytes]]
    image_exts: list[list[str]]
    nbytes: int

    @classmethod
    def from_table(cls, table) -> PartColumns:
        ids_col = table.column("input_ids").combine_chunks()
        loss_col = table.column("loss_mask").combine_chunks()
        offsets = ids_col.offsets.to_numpy().astype(np.int64)
        if not np.array_equal(loss_col.offsets.to_numpy(), offsets):
            raise BuildError("a cache part's loss_mask and input_ids lengths differ")
        lo, hi = int(offsets[0]), int(offsets[-1])
        lists = {c: table.column(c).to_pylist() for c in ("doc_id", "source", "modality")}
        if table.column("n_images").to_numpy().any():
            images, exts = table.column("images").to_pylist(), table.column("image_exts").to_pylist()
        else:  # text-only part: skip decoding two list columns of empty lists
            images = exts = [[] for _ in range(table.num_rows)]
        return cls(offsets - lo, ids_col.values.to_numpy()[lo:hi], loss_col.values.to_numpy()[lo:hi],
                   lists["doc_id"], lists["source"], lists["modality"], images, exts, nbytes=int(table.nbytes))


class PartTables:
    """Decoded cache parts kept by a shard writer between shards: every shard draws rows from every part,
    so without this each shard would re-read (and re-decode) the whole cache. LRU, bounded in bytes."""

    def __init__(self, max_bytes: int | None = None):
        self.max_bytes = max_bytes or int(os.environ.get("MLAN_BUILD_PART_CACHE_BYTES", str(1 << 30)))
        self.tables: OrderedDict = OrderedDict()
        self.nbytes = 0

    def get(self, url: str, part: int) -> PartColumns:
        key = (url, part)
        table = self.tables.get(key)
        if table is not None:
            self.tables.move_to_end(key)
            return table
        table = PartColumns.from_table(tcache.read_part(url, part))
        self.tables[key] = table
        self.nbytes += table.nbytes
        while self.nbytes > self.max_bytes and len(self.tables) > 1:
            _, old = self.tables.popitem(last=False)
            self.nbytes -= old.nbytes
        return table


class ShardWriter:
    """A Ray actor that writes shards (used when the build tokenized nothing, so no tokenizer actor is warm)."""

    def __init__(self):
        self.tables = PartTables()

    def write_shard(self, *args) -> dict:
        return write_shard(*args, tables=self.tables)


def write_shard(out: str, index: int, rows: dict, caches: list[str], sidecar: dict, seq_len: int,
                tables: PartTables | None = None) -> dict:
    """Cut one shard's packed rows out of the cache and write it (tmp → sidecar → rename).

    Rows are slices of each part's flat token arrays, with no per-document objects, so a shard costs the
    same however many parts the cache has.
    """
    tables = tables if tables is not None else PartTables()
    offsets = rows["offsets"].tolist()
    src, part, prow = rows["source"].tolist(), rows["part"].tolist(), rows["row"].tolist()
    samples = []
    info = {"rows": 0, "tokens": 0, "loss_tokens": 0, "tokens_by_modality": {"text": 0, "image_text": 0},
            "tokens_by_source": {}}
    by_modality, by_source = info["tokens_by_modality"], info["tokens_by_source"]
    for r in range(len(offsets) - 1):
        ids, loss, lengths, doc_ids, sources, modalities = [], [], [], [], [], []
        images, exts, image_docs = [], [], []
        for j, i in enumerate(range(offsets[r], offsets[r + 1])):
            cols, k = tables.get(caches[src[i]], part[i]), prow[i]
            a, b = int(cols.offsets[k]), int(cols.offsets[k + 1])
            ids.append(cols.ids[a:b])
            loss.append(cols.loss[a:b])
            lengths.append(b - a)
            doc_ids.append(cols.doc_id[k])
            sources.append(cols.source[k])
            modalities.append(cols.modality[k])
            if cols.images[k]:
                images += cols.images[k]
                exts += cols.image_exts[k]
                image_docs += [j] * len(cols.images[k])
            by_modality[cols.modality[k]] = by_modality.get(cols.modality[k], 0) + (b - a)
            by_source[cols.source[k]] = by_source.get(cols.source[k], 0) + (b - a)
        row = PackedRow(
            ids=np.concatenate(ids).astype(np.uint32, copy=False),
            loss=np.concatenate(loss).astype(np.uint8, copy=False),
            docs=np.array(lengths, dtype=np.uint32),
            doc_ids=doc_ids,
            sources=sources,
            modalities=modalities,
            images=images,
            image_exts=exts,
            image_docs=image_docs,
            key=row_key(index, r),
        )
        row.check()
        if len(row) > seq_len:
            raise BuildError(f"row {row.key} has {len(row)} tokens > seq_len {seq_len}")
        samples.append(row_to_sample(row))
        info["rows"] += 1
        info["tokens"] += len(row)
        info["loss_tokens"] += int(row.loss.sum())
    info["tokens_by_source"] = dict(sorted(info["tokens_by_source"].items()))
    fs, root = fs_of(out)
    final = f"{root}/{shard_name(index)}"
    with fs.open(final + ".tmp", "wb") as f:
        write_tar(f, samples)
    digest = sha256_of(fs.unstrip_protocol(final + ".tmp"))
    record = {"name": shard_name(index), "sha256": digest, **info}
    write_text_atomic(fs.unstrip_protocol(f"{root}/{PROGRESS_DIR}/shard-{index:06d}.json"), json.dumps({**sidecar, "shard": record}))
    fs.mv(final + ".tmp", final)
    return record


def shard_bounds(row_tokens: np.ndarray, target: int) -> np.ndarray:
    """Row index where each shard starts: a shard closes once it holds ≥ target tokens."""
    before = np.concatenate([[0], np.cumsum(row_tokens)[:-1]])
    shard_of_row = before // target
    _, starts = np.unique(shard_of_row, return_index=True)
    return np.concatenate([starts, [row_tokens.size]]).astype(np.int64)


def write_shards(out_url, packing: Packing, bounds, doc_source, doc_part, doc_row, cache_urls, fingerprint,
                 seq_len, progress, actors: list, workers: int) -> list[dict]:
    """Write the shards not already finished, on the warm tokenizer actors if any, else on `workers` writer
    actors (`ray.util.ActorPool`, two shards queued per actor); returns every shard's manifest record."""
    fs, root = fs_of(out_url)
    infos: list[dict | None] = [None] * (bounds.size - 1)
    jobs: list = []
    with mlan_progress.task("write shards", total=len(infos), unit="shards", enabled=progress) as bar:
        for k in range(len(infos)):
            rows = _shard_rows(packing, bounds, k, doc_source, doc_part, doc_row)
            h = hashlib.sha256(f"{fingerprint}:{seq_len}:{k}".encode())
            for v in rows.values():
                h.update(np.ascontiguousarray(v).tobytes())
            sidecar = {"plan": h.hexdigest()}
            done = finished_shard(fs, root, k, sidecar["plan"])
            if done is not None:
                infos[k] = done
                bar.advance(1)
                continue
            jobs.append((out_url, k, rows, cache_urls, sidecar, seq_len))
        own = []
        if jobs and not actors:
            own = [ray.remote(num_cpus=1)(ShardWriter).remote() for _ in range(max(1, min(workers, len(jobs))))]
        pool = ActorPool(list(actors or own) * 2)
        index_of = {shard_name(job[1]): job[1] for job in jobs}
        t0, tokens, rows = time.perf_counter(), 0, 0
        for info in pool.map_unordered(lambda actor, job: actor.write_shard.remote(*job), jobs):
            infos[index_of[info["name"]]] = info
            tokens += info["tokens"]
            rows += info["rows"]
            dt = max(time.perf_counter() - t0, 1e-9)
            bar.advance(1, rows_written=rows, tokens_per_s=round(tokens / dt))
    for a in own:
        ray.kill(a)
    return infos  # type: ignore[return-value]


def _shard_rows(packing: Packing, bounds, k: int, doc_source, doc_part, doc_row) -> dict[str, np.ndarray]:
    """Shard k's rows as offsets into its documents, and where each document lies in the cache."""
    r0, r1 = int(bounds[k]), int(bounds[k + 1])
    a, b = int(packing.offsets[r0]), int(packing.offsets[r1])
    items = packing.items[a:b]
    return {
        "offsets": (packing.offsets[r0 : r1 + 1] - a).astype(np.int64),
        "source": doc_source[items].astype(np.int64),
        "part": doc_part[items].astype(np.int64),
        "row": doc_row[items].astype(np.int64),
    }


def finished_shard(fs, root: str, index: int, plan_hash: str) -> dict | None:
    """The record of a shard an earlier run finished with this exact plan (sha256 re-checked), else None."""
    side = f"{root}/{PROGRESS_DIR}/shard-{index:06d}.json"
    final = f"{root}/{shard_name(index)}"
    if not (fs.exists(side) and fs.exists(final)):
        return None
    with fs.open(side, "r") as f:
        meta = json.load(f)
    if meta.get("plan") != plan_hash:
        return None
    if sha256_of(fs.unstrip_protocol(final)) != meta["shard"]["sha256"]:
        return None
    return meta["shard"]
