"""The tokenize stage: each source's records → rendered documents → cache parts, on a pool of Ray actors
(`ray.util.ActorPool`), one tokenizer per actor. A source whose cache is complete is a hit and is not read.
"""
from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import ray
from ray.util import ActorPool

from mlan import progress as mlan_progress
from mlan.families.registry import get_family
from mlan.mixture import cache as tcache
from mlan.mixture.cache_key import source_cache_keys
from mlan.mixture.pre_resize import pre_resize, store_8bit
from mlan.mixture.shards import join_url
from mlan.mixture.write import BuildError, PartTables, write_shard
from mlan.recipe import Recipe
from mlan.render import DocumentDropped, Renderer
from mlan.sources import RecordError, iter_source, to_conversations
from mlan.sources.images import ImageLimits
from mlan.sources.readers import RawLine

RECORDS_PER_PART = 512


class TokenizeWorker:
    """Renders batches of raw records into documents and writes them as cache parts (one tokenizer per actor)."""

    def __init__(self, recipe: Recipe, family_config: dict):
        """`recipe` is the driver's resolved Recipe object itself (pickled with which keys were set, so the
        family geometry resolves as in the driver); `family_config` is the driver's, checked here."""
        # one core per actor: set before the Rust tokenizer starts its thread pool (a job-level runtime_env
        # would do the same but makes Ray start fresh worker processes instead of its prestarted ones)
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        self.recipe = recipe
        limits = ImageLimits(recipe.mixture.max_image_pixels, recipe.mixture.max_image_aspect)
        self.renderer = Renderer(recipe.model, recipe.mixture.seq_len, recipe.mixture.overlong, image_limits=limits)
        mine = self.renderer.family.family_config()
        if mine != family_config:
            raise BuildError(f"a tokenizer actor resolved the model geometry as {mine}, the driver as {family_config}")
        self.pre_resize = self.recipe.shards.pre_resize

    def process(self, source_name: str, cache_url: str, part: int, items: list) -> dict:
        """One batch of records → one cache part. No record can make this raise: whatever fails for one
        record (decode, nesting, size, conversion, tokenizer, image) is that record's rejected.jsonl entry."""
        spec = self.recipe.source(source_name)
        max_bytes = self.recipe.mixture.max_record_bytes
        rejected, dropped, convs, conv_index = [], [], [], []
        file_of = {index: file for file, index, _ in items}
        for file, index, record in items:
            try:
                if isinstance(record, RecordError):
                    raise record
                if isinstance(record, RawLine):  # JSON lines are parsed here, on the workers
                    record = record.parse(file, index)
                found = to_conversations(spec, index, record, file)  # several for `tree_paths: all`
                for conv in found:  # before the tokenizer: a 10 MB record costs it seconds (or a panic)
                    if (n := conv.text_bytes()) > max_bytes:
                        raise RecordError(file, index, f"{n:,} bytes of text, more than mixture.max_record_bytes "
                                          f"= {max_bytes:,}")
                for conv in found:
                    convs.append(conv)
                    conv_index.append(index)
            except RecordError as err:
                rejected.append(tcache.rejected_entry(source_name, err, None if err is record else index, "read"))
            except Exception as err:  # noqa: BLE001 - a record is data: nothing in it may stop the build
                why = RecordError(file, index, f"cannot read the record: {_one_line(err)}")
                rejected.append(tcache.rejected_entry(source_name, why, index, "read"))
        docs, indices, files = [], [], []
        truncated = 0
        for index, out in zip(conv_index, self._render(convs)):
            if isinstance(out, RecordError):
                rejected.append(tcache.rejected_entry(source_name, out, index, "render"))
                continue
            if isinstance(out, DocumentDropped):
                why = RecordError(file_of[index], index, f"dropped for length (mixture.overlong: drop): {out.reason}")
                dropped.append(tcache.rejected_entry(source_name, why, index, "render", kind="dropped"))
                continue
            try:
                doc = pre_resize(out, self.renderer) if self.pre_resize and out.images else store_8bit(out)
            except Exception as err:  # noqa: BLE001 - decoded once already by the probe; still one record's
                why = RecordError(file_of[index], index, f"cannot resize the images: {_one_line(err)}", "image")
                rejected.append(tcache.rejected_entry(source_name, why, index, "render"))
                continue
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
        return {**summary.to_json(), "source": source_name, "meta": meta}

    def _render(self, convs: list) -> list:
        """`render_batch`, one tokenizer call for the batch; when that call fails (a tokenizer error or a
        Rust panic, which is a BaseException), each conversation again alone, so that only the ones that
        fail are rejected, each with its reason."""
        try:
            return self.renderer.render_batch(convs)
        except BaseException as err:  # re-raised unless _is_record_failure
            if not _is_record_failure(err):
                raise
        out: list = []
        for conv in convs:
            try:
                out += self.renderer.render_batch([conv])
            except BaseException as err:
                if not _is_record_failure(err):
                    raise
                out.append(RecordError(conv.meta.get("file", ""), conv.meta.get("index"), f"tokenizer failed: {_one_line(err)}"))
        return out

    def write_shard(self, *args) -> dict:
        """Shards are written by the already-warm tokenizer actors when a build tokenized anything."""
        if not hasattr(self, "tables"):
            self.tables = PartTables()
        return write_shard(*args, tables=self.tables)


def _is_record_failure(err: BaseException) -> bool:
    """An error from rendering one record's data: any Exception, and a Rust panic from the tokenizers
    library (pyo3's PanicException derives from BaseException); never Ctrl-C, SystemExit or a kill."""
    return isinstance(err, Exception) or type(err).__name__ == "PanicException"


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())[:300]
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


@dataclass
class SourceCache:
    url: str
    fingerprint: str
    n_parts: int
    hit: bool


def tokenize_sources(
    recipe: Recipe, cache_root: str, workers: int, progress: bool, keep_actors: list | None = None,
    family_config: dict | None = None,
) -> list[SourceCache]:
    """Fill (or reuse) each source's cache on a pool of Ray actors; reports cache hits.

    With `keep_actors`, the (warm) actors are appended to it instead of being killed. `family_config` is
    the driver's resolved geometry (computed here when not given): part of every cache key, and what each
    actor must resolve too.
    """
    family_config = family_config if family_config is not None else _family_config(recipe)
    caches: list[SourceCache] = []
    todo: list[int] = []
    for i, (src, fp) in enumerate(zip(recipe.sources, source_cache_keys(recipe, family_config))):
        url = join_url(cache_root, fp)
        done = tcache.read_complete(url)
        caches.append(SourceCache(url, fp, done["parts"] if done else 0, done is not None))
        if done is not None:
            if progress:
                mlan_progress.say(f"cache hit: source {src.name!r} ({fp}, {done['accepted']} documents)")
        else:
            todo.append(i)
    if not todo:
        return caches

    Worker = ray.remote(num_cpus=1)(TokenizeWorker)
    recipe_ref = ray.put(recipe)  # the object itself, never a dump re-validated (that marks defaults as set)
    actors = [Worker.remote(recipe_ref, family_config) for _ in range(max(1, workers))]
    pool = ActorPool(actors * 2)  # two batches queued per actor: it never waits for the driver
    metas: dict[int, dict] = {i: {} for i in todo}  # source → part → META_COLUMNS the actor returned
    index_of = {recipe.sources[i].name: i for i in todo}
    t0 = time.perf_counter()
    n_docs = n_tokens = 0
    with mlan_progress.task("tokenize", total=None, unit="documents", enabled=progress) as bar:

        def collect() -> None:
            nonlocal n_docs, n_tokens
            summary = pool.get_next_unordered()
            metas[index_of[summary["source"]]][summary["part"]] = summary["meta"]
            n_docs += summary["read"]
            n_tokens += summary["tokens"]
            dt = max(time.perf_counter() - t0, 1e-9)
            bar.advance(summary["read"], tokens_per_s=round(n_tokens / dt))

        for i in todo:
            src, c = recipe.sources[i], caches[i]
            if progress:
                mlan_progress.say(f"tokenizing source {src.name!r} → cache {c.fingerprint}")
            for part, batch in _record_batches(src):
                c.n_parts = part + 1
                if tcache.read_part_summary(c.url, part) is not None:  # written by an earlier, killed run
                    bar.advance(len(batch))
                    continue
                if not pool.has_free():  # back-pressure: the driver never reads far ahead of the actors
                    collect()
                pool.submit(lambda actor, job: actor.process.remote(*job), (src.name, c.url, part, batch))
        while pool.has_next():
            collect()
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


def _record_batches(src) -> Iterator[tuple[int, list]]:
    """(part, records) in record order, RECORDS_PER_PART each; one empty part for a source with no records."""
    part, batch = 0, []
    for file, index, record in iter_source(src, raw_lines=True):
        batch.append((file, index, record))
        if len(batch) == RECORDS_PER_PART:
            yield part, batch
            part, batch = part + 1, []
    if batch or part == 0:
        yield part, batch


def _family_config(recipe: Recipe) -> dict:
    return get_family(recipe.model).family_config()
