"""`mlan build`: tokenize on Ray actors → Parquet cache → plan → pack → shards written by Ray tasks.

Everything that decides the output (cache contents, plan, packing, shard boundaries) depends only on
the recipe and the inputs, never on which actor did what, so any worker count gives the same bytes.
Shards are written under a temporary name and renamed; a per-shard sidecar records the planned
content and sha256, so a restarted build skips finished shards. The manifest is written last.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlan.child_process import start_descendant_reaper
from mlan.mixture import cache as tcache
from mlan.mixture.pack import Packing, pack, row_bound
from mlan.mixture.plan import PlanError, SourceDocs, check_modalities, make_plan
from mlan.mixture.report import compute_stats, render_report
from mlan.mixture.shards import (
    MANIFEST,
    PackedRow,
    fs_of,
    join_url,
    row_key,
    row_to_sample,
    sha256_of,
    shard_name,
    write_manifest,
    write_tar,
    write_text_atomic,
)
from mlan.recipe import Recipe, load_recipe
from mlan.run_lock import lock_output
from mlan.sources.readers import check_source_paths

RECORDS_PER_PART = 512
PROGRESS_DIR = ".progress"  # per-shard sidecars: planned content + sha256 (what resume trusts)
ROWS_SEED_SALT = 0x726F7773  # "rows": the seeded row shuffle after packing


class BuildError(RuntimeError):
    """A broken build invariant (a bug, not bad input); one line saying what."""


# ---------------------------------------------------------------- helpers
def _console():
    from rich.console import Console

    return Console(stderr=True)


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        console=_console(),
        disable=not enabled,
        transient=False,
    )


# ---------------------------------------------------------------- Ray side
class TokenizeWorker:
    """Renders batches of raw records into documents and writes them as cache parts (one tokenizer per actor)."""

    def __init__(self, recipe: Recipe, family_config: dict):
        """`recipe` is the driver's resolved Recipe object itself (pickled with which keys were set, so the
        family geometry resolves as in the driver); `family_config` is the driver's, checked here."""
        # one core per actor: set before the Rust tokenizer starts its thread pool (a job-level runtime_env
        # would do the same but makes Ray start fresh worker processes instead of its prestarted ones)
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        from mlan.render import Renderer
        from mlan.sources.images import ImageLimits, set_image_limits

        set_image_limits(ImageLimits(recipe.mixture.max_image_pixels, recipe.mixture.max_image_aspect))
        self.recipe = recipe
        self.renderer = Renderer(self.recipe.model, self.recipe.mixture.seq_len, self.recipe.mixture.overlong)
        mine = self.renderer.family.family_config()
        if mine != family_config:
            raise BuildError(f"a tokenizer actor resolved the model geometry as {mine}, the driver as {family_config}")
        self.pre_resize = self.recipe.shards.pre_resize

    def process(self, source_name: str, cache_url: str, part: int, items: list) -> dict:
        from mlan.render import DocumentDropped
        from mlan.sources import RecordError, to_conversations
        from mlan.sources.readers import RawLine

        spec = self.recipe.source(source_name)
        rejected, dropped, convs, conv_index = [], [], [], []
        file_of = {index: file for file, index, _ in items}
        for file, index, record in items:
            try:
                if isinstance(record, RecordError):
                    raise record
                if isinstance(record, RawLine):  # JSON lines are parsed here, on the workers
                    record = record.parse(file, index)
                for conv in to_conversations(spec, index, record, file):  # several for `tree_paths: all`
                    convs.append(conv)
                    conv_index.append(index)
            except RecordError as err:
                rejected.append(tcache.rejected_entry(source_name, err, None if err is record else index, "read"))
        docs, indices, files = [], [], []
        truncated = 0
        for index, out in zip(conv_index, self.renderer.render_batch(convs)):
            if isinstance(out, RecordError):
                rejected.append(tcache.rejected_entry(source_name, out, index, "render"))
                continue
            if isinstance(out, DocumentDropped):
                why = RecordError(file_of[index], index, f"dropped for length (mixture.overlong: drop): {out.reason}")
                dropped.append(tcache.rejected_entry(source_name, why, index, "render", kind="dropped"))
                continue
            doc = _pre_resize(out, self.renderer) if self.pre_resize and out.images else out
            truncated += int(doc.truncated)
            docs.append(doc)
            indices.append(index)
            files.append(file_of[index])
        rejected.sort(key=lambda r: (r["index"] is None, r["index"] or 0))
        notes = Counter(note for conv in convs for note in conv.notes)
        summary = tcache.PartSummary(
            part=part, read=len(items), accepted=len(docs), rejected=rejected, dropped=dropped,
            truncated=truncated, tokens=int(sum(d.n_tokens for d in docs)), notes=dict(sorted(notes.items())),
        )
        meta = tcache.write_part(cache_url, part, docs, indices, summary, files)
        return {**summary.to_json(), "meta": meta}

    def write_shard(self, *args) -> dict:
        """Shards are written by the already-warm tokenizer actors when a build tokenized anything."""
        if not hasattr(self, "tables"):
            self.tables = PartTables()
        return write_shard(*args, tables=self.tables)


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


def _pre_resize(doc, renderer):
    """Store images at the family's resolution (smaller shards, no resize in the loader)."""
    import io

    from PIL import Image

    from mlan.sources.images import open_oriented

    family = getattr(renderer, "family", None)
    geometry = getattr(family, "geometry", None)
    size = getattr(geometry, "image_size", None)
    if not size:
        return doc
    tiles = max(1, int(getattr(geometry, "max_tiles", 1)))
    images, exts, sizes = [], [], []
    for data in doc.images:
        im = open_oriented(data)  # the loader's decode: EXIF orientation applied, so none is stored
        if tiles == 1:  # llava: the vision tower's square input
            im = im.resize((size, size), Image.BICUBIC)
        else:  # mllama: fit inside the largest tile canvas, keeping the aspect ratio
            scale = min(1.0, size * tiles / max(im.size))
            im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.BICUBIC)
        buf = io.BytesIO()
        im.save(buf, format="PNG", optimize=False)
        images.append(buf.getvalue())
        exts.append("png")
        sizes.append(im.size)
    doc.images, doc.image_exts, doc.image_sizes = images, exts, sizes
    return doc


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


# ---------------------------------------------------------------- driver
@dataclass
class SourceCache:
    url: str
    fingerprint: str
    n_parts: int
    hit: bool


def _start_ray(workers: int | None, address: str | None) -> bool:
    """Join `address` or start a local Ray sized by `workers`; True when this call started it."""
    import ray

    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=False, logging_level="ERROR")
    else:
        # "local": a fresh Ray even when some other cluster runs on this machine (ray would join it otherwise)
        ray.init(address="local", num_cpus=workers or os.cpu_count(), include_dashboard=False,
                 log_to_driver=False, logging_level="ERROR")
    return True


def _tokenizer_fp(recipe: Recipe) -> str:
    """A cache key for the tokenizer from its files (no transformers import in the driver)."""
    import importlib.util

    name = recipe.model.tokenizer
    h = hashlib.sha256(name.encode())
    if name == "llama3":
        spec = importlib.util.find_spec("llama_models")
        files = [Path(spec.origin).parent / "llama3" / "tokenizer.model"] if spec and spec.origin else []
    else:
        p = Path(name)
        files = sorted(f for f in p.iterdir() if f.is_file() and f.stat().st_size < (64 << 20)) if p.is_dir() else (
            [p] if p.is_file() else [])  # a hub id: its name (and the code fingerprint) is the key
    for f in files:
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def tokenize_sources(
    recipe: Recipe, cache_root: str, workers: int, progress: bool, keep_actors: list | None = None,
    family_config: dict | None = None,
) -> list[SourceCache]:
    """Fill (or reuse) each source's cache on a pool of Ray actors; reports cache hits.

    With `keep_actors`, the (warm) actors are appended to it instead of being killed. `family_config` is
    the driver's resolved geometry (computed here when not given): part of every cache key, and what each
    actor must resolve too.
    """
    import ray

    from mlan.sources import iter_source

    console = _console()
    family_config = family_config if family_config is not None else _family_config(recipe)
    tok_fp, code_fp = _tokenizer_fp(recipe), tcache.code_fingerprint()
    caches: list[SourceCache] = []
    todo: list[int] = []
    for i, src in enumerate(recipe.sources):
        fp = tcache.source_fingerprint(recipe, src, tok_fp, code_fp, family_config=family_config)
        url = join_url(cache_root, fp)
        done = tcache.read_complete(url)
        caches.append(SourceCache(url, fp, done["parts"] if done else 0, done is not None))
        if done is not None:
            if progress:
                console.print(f"cache hit: source {src.name!r} ({fp}, {done['accepted']} documents)")
        else:
            todo.append(i)
    if not todo:
        return caches

    Worker = ray.remote(num_cpus=1)(TokenizeWorker)
    recipe_ref = ray.put(recipe)  # the object itself, never a dump re-validated (that marks defaults as set)
    actors = [Worker.remote(recipe_ref, family_config) for _ in range(max(1, workers))]
    idle = list(actors) * 2  # two batches queued per actor: it never waits for the driver
    inflight: dict = {}  # ref → (actor, source, part)
    metas: dict[int, dict] = {i: {} for i in todo}  # source → part → META_COLUMNS the actor returned
    t0 = time.perf_counter()
    n_docs = n_tokens = 0
    with _progress(progress) as bar:
        task = bar.add_task("tokenize", total=None, rate="")

        def collect(block: bool) -> None:
            nonlocal n_docs, n_tokens
            while inflight and (block or len(idle) == 0):
                ready, _ = ray.wait(list(inflight), num_returns=1)
                actor, source, part = inflight.pop(ready[0])
                summary = ray.get(ready[0])
                metas[source][part] = summary["meta"]
                idle.append(actor)
                n_docs += summary["read"]
                n_tokens += summary["tokens"]
                dt = max(time.perf_counter() - t0, 1e-9)
                bar.update(task, advance=summary["read"], rate=f"{n_docs / dt:,.0f} docs/s · {n_tokens / dt:,.0f} tok/s")
                if not block:
                    return

        for i in todo:
            src, c = recipe.sources[i], caches[i]
            if progress:
                console.print(f"tokenizing source {src.name!r} → cache {c.fingerprint}")
            part, batch = 0, []

            def submit(part: int, batch: list, src=src, c=c, i=i) -> None:
                if tcache.read_part_summary(c.url, part) is not None:  # written by an earlier, killed run
                    bar.update(task, advance=len(batch))
                    return
                collect(block=False)
                actor = idle.pop()
                inflight[actor.process.remote(src.name, c.url, part, batch)] = (actor, i, part)

            for file, index, record in iter_source(src, raw_lines=True):
                batch.append((file, index, record))
                if len(batch) == RECORDS_PER_PART:
                    submit(part, batch)
                    part, batch = part + 1, []
            if batch or part == 0:
                submit(part, batch)
                part += 1
            c.n_parts = part
        collect(block=True)
    if keep_actors is not None:
        keep_actors.extend(actors)
    else:
        for a in actors:
            ray.kill(a)
    for i in todo:
        c = caches[i]
        sums = [tcache.read_part_summary(c.url, p) for p in range(c.n_parts)]
        tcache.write_meta(c.url, c.n_parts, metas[i])  # parts from a killed earlier run are read back
        tcache.mark_complete(c.url, c.n_parts, {
            "source": recipe.sources[i].name,
            "read": sum(s.read for s in sums), "accepted": sum(s.accepted for s in sums),
            "rejected": sum(len(s.rejected) for s in sums), "dropped": sum(len(s.dropped) for s in sums),
        })
    return caches


def _family_config(recipe: Recipe) -> dict:
    from mlan.families import get_family

    return get_family(recipe.model).family_config()


def _column(values: list) -> np.ndarray:
    """A meta column as numpy; list-valued columns become object arrays."""
    if values and isinstance(values[0], list):
        out = np.empty(len(values), dtype=object)
        out[:] = values
        return out
    return np.asarray(values)


def _shard_bounds(row_tokens: np.ndarray, target: int) -> np.ndarray:
    """Row index where each shard starts: a shard closes once it holds ≥ target tokens."""
    before = np.concatenate([[0], np.cumsum(row_tokens)[:-1]])
    shard_of_row = before // target
    _, starts = np.unique(shard_of_row, return_index=True)
    return np.concatenate([starts, [row_tokens.size]]).astype(np.int64)


def build(
    recipe: Recipe,
    out: str,
    workers: int | None = None,
    address: str | None = None,
    cache_dir: str | None = None,
    progress: bool = True,
) -> dict:
    """Build the shards of `recipe` into `out` (path or fsspec URL); returns the stats written to stats.json."""
    import ray

    if not recipe.sources:
        raise BuildError("the recipe has no sources")
    check_source_paths(recipe.sources)  # a missing path fails here, before Ray starts and other sources are read
    mix = recipe.mixture
    check_modalities([s.modality for s in recipe.sources], mix.ratio.text)  # before any work
    console = _console()
    fs, root = fs_of(out)
    fs.makedirs(f"{root}/shards", exist_ok=True)
    fs.makedirs(f"{root}/{PROGRESS_DIR}", exist_ok=True)
    if fs.exists(f"{root}/{MANIFEST}"):
        fs.rm(f"{root}/{MANIFEST}")  # the old manifest no longer describes what is on disk
    out_url = fs.unstrip_protocol(root)
    cache_root = cache_dir or tcache.default_cache_dir()
    family_config = _family_config(recipe)

    clock = [("start", time.perf_counter())]
    started = _start_ray(workers, address)
    clock.append(("ray", time.perf_counter()))
    try:
        n_workers = workers or int(ray.cluster_resources().get("CPU", os.cpu_count() or 1))
        actors: list = []
        caches = tokenize_sources(recipe, cache_root, n_workers, progress, keep_actors=actors,
                                  family_config=family_config)
        clock.append(("tokenize", time.perf_counter()))
        fingerprint = tcache.combine_fingerprints([c.fingerprint for c in caches])

        # ---- per-source document tables (record order) → plan
        arrays, too_many = source_arrays(recipe, caches)
        # every record that does not reach the mixture, listed before planning: a plan that fails still leaves it
        summaries, rejected, dropped = _record_summaries(recipe, caches, too_many)
        write_text_atomic(f"{out_url}/rejected.jsonl",
                          "".join(json.dumps(r, sort_keys=True) + "\n" for r in _listing(recipe, rejected, dropped)))
        sources = source_docs(recipe, arrays)
        try:
            plan = make_plan(
                sources, budget_tokens=mix.budget.tokens, budget_examples=mix.budget.examples,
                ratio_text=mix.ratio.text, ratio_by=mix.ratio.by, seed=mix.seed,
            )
        except PlanError as err:
            raise PlanError(str(err) + _unusable_hint(summaries, rejected, f"{out}/rejected.jsonl")) from None
        planned = {
            k: np.concatenate([arrays[s][k][plan.doc[plan.source == s]] for s in range(len(sources))])
            for k in ("n_tokens", "n_loss_tokens", "n_images", "n_tiles", "n_vision_tokens", "truncated", "modality",
                      "image_tiles")
        }
        # restore plan order (the concatenation above is grouped by source)
        order = np.concatenate([np.flatnonzero(plan.source == s) for s in range(len(sources))])
        inv = np.empty_like(order)
        inv[order] = np.arange(order.size)
        planned = {k: v[inv] for k, v in planned.items()}
        planned["source"] = np.array([s.name for s in recipe.sources], dtype=object)[plan.source]
        part_of = np.concatenate([arrays[s]["part"] for s in range(len(sources))])
        row_of = np.concatenate([arrays[s]["row"] for s in range(len(sources))])
        base = np.cumsum([0] + [len(a["n_tokens"]) for a in arrays])[:-1]
        flat = base[plan.source] + plan.doc
        doc_part, doc_row = part_of[flat], row_of[flat]

        # ---- pack, then a seeded row order so rows are not sorted by length
        packing = pack(plan.n_tokens, planned["n_images"], seq_len=mix.seq_len, max_images=mix.max_images_per_row,
                       buffer_tokens=mix.pack_buffer_tokens)
        packing = packing.permuted(np.random.default_rng([mix.seed, ROWS_SEED_SALT]).permutation(packing.n_rows))
        bounds = _shard_bounds(packing.row_tokens, recipe.shards.target_tokens)
        n_shards = bounds.size - 1

        clock.append(("plan+pack", time.perf_counter()))
        # ---- shards (parallel Ray tasks; finished ones are kept)
        shard_infos = _write_shards(
            out_url, packing, bounds, plan.source, doc_part, doc_row, [c.url for c in caches],
            fingerprint, mix.seq_len, progress, actors, n_workers,
        )
        for a in actors:
            ray.kill(a)
        for stale in fs.glob(f"{root}/shards/shard-*.tar*"):  # from an earlier build with more shards
            if Path(stale).name not in {Path(s["name"]).name for s in shard_infos}:
                fs.rm(stale)

        clock.append(("write", time.perf_counter()))
        # ---- stats, report, manifest (last)
        stats = compute_stats(
            seq_len=mix.seq_len, plan=plan, planned=planned, packing=packing, source_summaries=summaries,
            rejected=rejected, dropped=dropped, n_shards=n_shards, fingerprint=fingerprint,
        )
        stats["row_bound"] = row_bound(int(packing.row_tokens.sum()), int(planned["n_images"].sum()), mix.seq_len,
                                       mix.max_images_per_row)
        write_text_atomic(f"{out_url}/stats.json", json.dumps(stats, indent=2) + "\n")
        write_text_atomic(f"{out_url}/report.md", render_report(stats))
        manifest = {
            "version": 1,
            "recipe": recipe.to_dict(),
            "fingerprint": fingerprint,
            "seed": mix.seed,
            "seq_len": mix.seq_len,
            "family_config": family_config,
            "images": {"pre_resized": bool(recipe.shards.pre_resize)},
            "totals": {
                "rows": packing.n_rows,
                "tokens": int(packing.row_tokens.sum()),
                "loss_tokens": int(sum(s["loss_tokens"] for s in shard_infos)),
                "tokens_by_modality": stats["tokens"]["by_modality"],
                "documents": len(plan),
            },
            "shards": shard_infos,
        }
        write_manifest(out_url, manifest)
        if progress:
            console.print(
                f"built {packing.n_rows} rows in {n_shards} shards → {out}: {stats['tokens']['total']:,} tokens, "
                f"text ratio {stats['ratio_achieved']:.4f} (target {mix.ratio.text}), "
                f"packing {stats['packing_efficiency']:.4f} ({packing.n_rows} rows, bound {stats['row_bound']})"
            )
            clock.append(("report", time.perf_counter()))
            console.print("time: " + ", ".join(f"{name} {t - clock[i][1]:.1f}s" for i, (name, t) in enumerate(clock[1:])))
        return stats
    finally:
        if started:
            ray.shutdown()


def source_arrays(recipe: Recipe, caches: list[SourceCache]) -> tuple[list[dict], list[list[dict]]]:
    """Per source, its usable documents' meta columns (record order) and the plan-time rejections: documents
    with more images than a row may hold (listed with their file)."""
    mix = recipe.mixture
    metas = [tcache.read_meta(c.url, c.n_parts).to_pydict() for c in caches]
    arrays = [{k: _column(v) for k, v in m.items()} for m in metas]
    too_many: list[list[dict]] = []
    for s, a, c in zip(recipe.sources, arrays, caches):
        over = a["n_images"] > mix.max_images_per_row if a["n_images"].size else np.zeros(0, bool)
        too_many.append([
            {"source": s.name, "index": int(i), "file": f, "field": "images", "kind": "rejected", "stage": "plan",
             "reason": f"{int(n)} images, more than mixture.max_images_per_row = {mix.max_images_per_row}"}
            for i, n, f in zip(a["index"][over].tolist(), a["n_images"][over].tolist(),
                               _files_of(c.url, a["part"][over], a["row"][over]))
        ])
        if over.any():
            for k in a:
                a[k] = a[k][~over]
    return arrays, too_many


def source_docs(recipe: Recipe, arrays: list[dict]) -> list[SourceDocs]:
    """What the planner needs of each source; each document keeps its own modality (has images or not)."""
    mix = recipe.mixture
    return [
        SourceDocs(
            name=s.name, modality=s.modality, weight=s.weight,
            upsample=s.upsample if s.upsample is not None else mix.upsample,
            n_tokens=arrays[i]["n_tokens"].astype(np.int64),
            has_images=arrays[i]["n_images"] > 0,
        )
        for i, s in enumerate(recipe.sources)
    ]


def _files_of(cache_url: str, parts: np.ndarray, rows: np.ndarray) -> list[str]:
    """Input files of a few documents, by (part, row) in the cache: only read for plan-time rejections."""
    out: list[str] = []
    for p, r in zip(parts.tolist(), rows.tolist()):
        out += tcache.doc_files(cache_url, int(p), [int(r)])
    return out


def _record_summaries(recipe: Recipe, caches: list[SourceCache], too_many: list[list[dict]]
                      ) -> tuple[dict, list[dict], list[dict]]:
    """Per source: records read / accepted / rejected / dropped / truncated; and the rejected and dropped lists."""
    summaries, rejected, dropped = {}, [], []
    for s, c, extra in zip(recipe.sources, caches, too_many):
        parts = [tcache.read_part_summary(c.url, p) for p in range(c.n_parts)]
        rej = sorted([r for p in parts for r in p.rejected] + extra, key=lambda r: (r["index"] is None, r["index"] or 0))
        drp = [d for p in parts for d in p.dropped]
        summaries[s.name] = {"read": sum(p.read for p in parts),
                             "accepted": sum(p.accepted for p in parts) - len(extra),
                             "rejected": len(rej), "dropped": len(drp), "truncated": sum(p.truncated for p in parts),
                             "notes": dict(sorted(sum((Counter(p.notes) for p in parts), Counter()).items()))}
        rejected += rej
        dropped += drp
    return summaries, rejected, dropped


def _listing(recipe: Recipe, rejected: list[dict], dropped: list[dict]) -> list[dict]:
    """rejected.jsonl: every record that does not reach the mixture, source by source in record order."""
    order = {s.name: i for i, s in enumerate(recipe.sources)}
    return sorted(rejected + dropped, key=lambda r: (order.get(r["source"], 0), r["index"] is None, r["index"] or 0))


def _unusable_hint(summaries: dict, rejected: list[dict], listing: str) -> str:
    """For each source with no usable document: how many records it had and its three commonest reasons."""
    from collections import Counter

    from mlan.mixture.report import reason_kind

    hints = []
    for name, s in summaries.items():
        if s["accepted"] > 0:
            continue
        reasons = Counter(reason_kind(r["reason"]) for r in rejected if r["source"] == name)
        examples = {}
        for r in rejected:
            if r["source"] == name:
                examples.setdefault(reason_kind(r["reason"]), r)
        top = "; ".join(f"{n}× {examples[k]['reason']} ({examples[k]['file']})".replace("\n", " ")
                        for k, n in reasons.most_common(3))
        hints.append(f"source {name!r}: 0 of {s['read']} records usable ({s['rejected']} rejected, "
                     f"{s['dropped']} dropped)" + (f", commonest reasons: {top}" if top else ""))
    return (" — " + " | ".join(hints) + f" (every record listed in {listing})") if hints else ""


def _write_shards(out_url, packing: Packing, bounds, doc_source, doc_part, doc_row, cache_urls, fingerprint,
                  seq_len, progress, actors: list, workers: int) -> list[dict]:
    """Write the shards not already finished, on the warm tokenizer actors if any, else on `workers` writer actors."""
    import ray

    fs, root = fs_of(out_url)
    infos: list[dict | None] = [None] * (bounds.size - 1)
    refs: dict = {}
    jobs: list = []
    with _progress(progress) as bar:
        task = bar.add_task("write shards", total=len(infos), rate="")
        t0, tokens = time.perf_counter(), 0
        for k in range(len(infos)):
            r0, r1 = int(bounds[k]), int(bounds[k + 1])
            a, b = int(packing.offsets[r0]), int(packing.offsets[r1])
            items = packing.items[a:b]
            rows = {
                "offsets": (packing.offsets[r0 : r1 + 1] - a).astype(np.int64),
                "source": doc_source[items].astype(np.int64),
                "part": doc_part[items].astype(np.int64),
                "row": doc_row[items].astype(np.int64),
            }
            h = hashlib.sha256(f"{fingerprint}:{seq_len}:{k}".encode())
            for v in rows.values():
                h.update(np.ascontiguousarray(v).tobytes())
            sidecar = {"plan": h.hexdigest()}
            done = _finished_shard(fs, root, k, sidecar["plan"])
            if done is not None:
                infos[k] = done
                bar.update(task, advance=1)
                continue
            jobs.append((out_url, k, rows, cache_urls, sidecar, seq_len))
        own = []
        if jobs and not actors:
            own = [ray.remote(num_cpus=1)(ShardWriter).remote() for _ in range(max(1, min(workers, len(jobs))))]
        pool = actors or own
        idle = list(pool) * 2
        jobs.reverse()
        while jobs or refs:
            while jobs and idle:
                job, actor = jobs.pop(), idle.pop()
                refs[actor.write_shard.remote(*job)] = (job[1], actor)
            ready, _ = ray.wait(list(refs), num_returns=1)
            k, actor = refs.pop(ready[0])
            idle.append(actor)
            info = ray.get(ready[0])
            infos[k] = info
            tokens += info["tokens"]
            dt = max(time.perf_counter() - t0, 1e-9)
            bar.update(task, advance=1, rate=f"{tokens / dt:,.0f} tok/s")
    for a in own:
        ray.kill(a)
    return infos  # type: ignore[return-value]


def _finished_shard(fs, root: str, index: int, plan_hash: str) -> dict | None:
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


# ---------------------------------------------------------------- CLI
def default_out(recipe_path: str) -> str:
    return str(Path("out") / Path(recipe_path).stem)


def build_command(args) -> int:
    """`mlan build`; an impossible plan is a PlanError (a RecipeError): one line, exit status 2."""
    recipe = load_recipe(args.recipe, args.overrides)
    out = args.out or default_out(args.recipe)
    check_source_paths(recipe.sources)  # before the lock: a typo must not create the --out folder
    lock = lock_output(out, "build")  # one writer per --out (LockError names the live holder)
    reaper = start_descendant_reaper()  # a killed build leaves no Ray agent or worker behind
    try:
        build(recipe, out, workers=args.workers, address=args.address, cache_dir=args.cache, progress=True)
    finally:
        if reaper is not None:  # the build ended on its own (Ray shut down): the reaper is not needed
            reaper.terminate()
            reaper.wait()
        if lock is not None:
            lock.release()
    return 0


if __name__ == "__main__":  # pragma: no cover
    from mlan.cli import main

    sys.exit(main(["build", *sys.argv[1:]]))
