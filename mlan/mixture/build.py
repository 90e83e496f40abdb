"""`mlan build`: the stages in order, tokenize (mixture/tokenize.py, Ray actors → Parquet cache) → select
and plan (plan.py) → pack (pack.py) → write (write.py, Ray actors → shards) → report (report.py, stats and
the manifest, last); this module sequences them and owns resume and the output lock.

Everything that decides the output (cache contents, plan, packing, shard boundaries) depends only on
the recipe and the inputs, never on which actor did what, so any worker count gives the same bytes.
Shards are written under a temporary name and renamed; a per-shard sidecar records the planned
content and sha256, so a restarted build skips finished shards. The manifest is written last.
"""
from __future__ import annotations

import json
import os
import socket
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray

from mlan import progress as mlan_progress
from mlan.atomic_write import write_text_atomic
from mlan.child_process import start_descendant_reaper
from mlan.errors import UserError, one_line
from mlan.mixture import cache as tcache
from mlan.mixture import plan_warnings
from mlan.mixture.cache_key import combine_fingerprints
from mlan.mixture.pack import Packing, pack, row_bound
from mlan.mixture.plan import Plan, PlanError, SourceDocs, check_modalities, make_plan
from mlan.mixture.report import compute_stats, reason_kind, render_report
from mlan.mixture.shards import MANIFEST, fs_of, write_manifest
from mlan.mixture.tokenize import SourceCache, _family_config, tokenize_sources
from mlan.mixture.write import PROGRESS_DIR, BuildError, shard_bounds, write_shards
from mlan.recipe import Recipe
from mlan.run_lock import lock_output
from mlan.sources.readers import check_source_paths

ROWS_SEED_SALT = 0x726F7773  # "rows": the seeded row shuffle after packing
__all__ = ["PROGRESS_DIR", "BuildError", "build", "build_locked", "source_arrays", "source_docs", "tokenize_sources"]


def _start_ray(workers: int | None, address: str | None) -> bool:
    """Join `address` or start a local Ray sized by `workers`; True when this call started it."""
    if ray.is_initialized():
        return False
    if address:
        check_reachable(address)
        try:
            ray.init(address=address, log_to_driver=False, logging_level="ERROR")
        except ConnectionError as err:  # ray.init's own message, after its retries
            raise UserError(f"--address {address}: cannot join the Ray cluster ({one_line(err)})") from None
    else:
        # Ray's usage statistics off unless the user turned them on: an offline machine spends ~1 s of every
        # local start on them (ray.init 3.3 s -> 2.3 s here); mlan's pipeline children already run without them
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        # "local": a fresh Ray even when some other cluster runs on this machine (ray would join it otherwise)
        ray.init(address="local", num_cpus=workers or os.cpu_count(), include_dashboard=False,
                 log_to_driver=False, logging_level="ERROR")
    return True


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """A HOST:PORT address nobody listens on is one line at once (ray.init retries for about 20 s, then raises a
    traceback); other forms (`auto`, `ray://…`) are left to Ray."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or "/" in host:
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as err:
        raise UserError(f"--address {address}: no Ray cluster answers there ({err.strerror or err}); start one "
                         "with `ray start --head` or leave --address out for a local Ray") from None


def _column(values: list) -> np.ndarray:
    """A meta column as numpy; list-valued columns become object arrays."""
    if values and isinstance(values[0], list):
        out = np.empty(len(values), dtype=object)
        out[:] = values
        return out
    return np.asarray(values)


@dataclass
class Selection:
    """The select/plan stage's result: the plan, its documents' columns in plan order, where each lies in the
    cache, and every record that does not reach the mixture (for the report)."""

    plan: Plan
    planned: dict[str, np.ndarray]
    doc_part: np.ndarray
    doc_row: np.ndarray
    summaries: dict
    rejected: list[dict]
    dropped: list[dict]


def build(
    recipe: Recipe,
    out: str,
    workers: int | None = None,
    address: str | None = None,
    cache_dir: str | None = None,
    progress: bool = True,
) -> dict:
    """Build the shards of `recipe` into `out` (path or fsspec URL); returns the stats written to stats.json."""
    if not recipe.sources:
        raise BuildError("the recipe has no sources")
    check_source_paths(recipe.sources)  # a missing path fails here, before Ray starts and other sources are read
    mix = recipe.mixture
    check_modalities([s.modality for s in recipe.sources], mix.ratio.text)  # before any work
    fs, root = fs_of(out)
    fs.makedirs(f"{root}/shards", exist_ok=True)
    fs.makedirs(f"{root}/{PROGRESS_DIR}", exist_ok=True)
    if fs.exists(f"{root}/{MANIFEST}"):
        fs.rm(f"{root}/{MANIFEST}")  # the old manifest no longer describes what is on disk
    out_url = fs.unstrip_protocol(root)
    family_config = _family_config(recipe)
    plan_warnings.say(plan_warnings.recipe_warnings(recipe))  # before Ray: probable mistakes, one line each

    clock = [("start", time.perf_counter())]
    started = _start_ray(workers, address)
    clock.append(("ray", time.perf_counter()))
    try:
        n_workers = workers or int(ray.cluster_resources().get("CPU", os.cpu_count() or 1))
        actors: list = []
        cache_root = cache_dir or tcache.default_cache_dir()
        with tcache.cache_lock(cache_root):  # a second build on this cache waits, then finds its entries complete
            caches = tokenize_sources(recipe, cache_root, n_workers, progress, keep_actors=actors,
                                      family_config=family_config)
        clock.append(("tokenize", time.perf_counter()))
        fingerprint = combine_fingerprints([c.fingerprint for c in caches])
        sel = select(recipe, caches, out, out_url)
        plan_warnings.say(plan_warnings.plan_warnings(recipe, sel.plan, sel.summaries))
        # pack, then a seeded row order so rows are not sorted by length
        packing = pack(sel.plan.n_tokens, sel.planned["n_images"], seq_len=mix.seq_len,
                       max_images=mix.max_images_per_row, buffer_tokens=mix.pack_buffer_tokens)
        packing = packing.permuted(np.random.default_rng([mix.seed, ROWS_SEED_SALT]).permutation(packing.n_rows))
        bounds = shard_bounds(packing.row_tokens, recipe.shards.target_tokens)
        clock.append(("plan+pack", time.perf_counter()))
        shard_infos = write_shards(
            out_url, packing, bounds, sel.plan.source, sel.doc_part, sel.doc_row, [c.url for c in caches],
            fingerprint, mix.seq_len, progress, actors, n_workers,
        )  # finished shards of an earlier run are kept
        for a in actors:
            ray.kill(a)
        for stale in fs.glob(f"{root}/shards/shard-*.tar*"):  # from an earlier build with more shards
            if Path(stale).name not in {Path(s["name"]).name for s in shard_infos}:
                fs.rm(stale)
        clock.append(("write", time.perf_counter()))
        stats = _report(recipe, out_url, sel, packing, shard_infos, fingerprint, family_config, bounds.size - 1)
        if progress:
            mlan_progress.say(
                f"built {packing.n_rows} rows in {bounds.size - 1} shards → {out}: {stats['tokens']['total']:,} "
                f"tokens, text ratio {stats['ratio_achieved']:.4f} (target {mix.ratio.text}), packing "
                f"{stats['packing_efficiency']:.4f} ({packing.n_rows} rows, bound {stats['row_bound']})"
            )
            clock.append(("report", time.perf_counter()))
            mlan_progress.say("time: " + ", ".join(f"{name} {t - clock[i][1]:.1f}s"
                                                 for i, (name, t) in enumerate(clock[1:])))
        return stats
    finally:
        if started:
            ray.shutdown()


def select(recipe: Recipe, caches: list[SourceCache], out: str, out_url: str) -> Selection:
    """Per-source document tables (record order) → rejected.jsonl (first: a plan that fails still leaves it)
    → the plan → its documents' columns in plan order."""
    mix = recipe.mixture
    arrays, too_many = source_arrays(recipe, caches)
    summaries, rejected, dropped = _record_summaries(recipe, caches, too_many)
    write_text_atomic(f"{out_url}/rejected.jsonl",
                      "".join(json.dumps(r, sort_keys=True) + "\n" for r in _listing(recipe, rejected, dropped)))
    sources = source_docs(recipe, arrays)
    try:
        plan = make_plan(
            sources, budget_tokens=mix.budget.tokens, budget_examples=mix.budget.examples,
            ratio_text=mix.ratio.text, ratio_by=mix.ratio.by, seed=mix.seed, max_upsample=mix.max_upsample,
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
    return Selection(plan, planned, part_of[flat], row_of[flat], summaries, rejected, dropped)


def _report(recipe: Recipe, out_url: str, sel: Selection, packing: Packing, shard_infos: list[dict],
            fingerprint: str, family_config: dict, n_shards: int) -> dict:
    """stats.json, report.md, then the manifest (last: its presence marks a finished build); returns the stats."""
    mix = recipe.mixture
    stats = compute_stats(
        seq_len=mix.seq_len, plan=sel.plan, planned=sel.planned, packing=packing, source_summaries=sel.summaries,
        rejected=sel.rejected, dropped=sel.dropped, n_shards=n_shards, fingerprint=fingerprint,
    )
    stats["row_bound"] = row_bound(int(packing.row_tokens.sum()), int(sel.planned["n_images"].sum()), mix.seq_len,
                                   mix.max_images_per_row)
    write_text_atomic(f"{out_url}/stats.json", json.dumps(stats, indent=2) + "\n")
    write_text_atomic(f"{out_url}/report.md", render_report(stats))
    write_manifest(out_url, {
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
            "documents": len(sel.plan),
        },
        "shards": shard_infos,
    })
    return stats


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


# ---------------------------------------------------------------- one locked build
def build_locked(recipe: Recipe, out: str, workers: int | None = None, address: str | None = None,
                 cache_dir: str | None = None) -> None:
    """`mlan build`: checks that need no lock first (a typo must not create the `out` folder), then one writer
    per `out` and a reaper so that a killed build leaves no Ray agent or worker behind."""
    check_source_paths(recipe.sources)
    check_modalities([s.modality for s in recipe.sources], recipe.mixture.ratio.text)  # nor an impossible plan
    lock = lock_output(out, "build")  # LockError names the live holder
    reaper = start_descendant_reaper()
    try:
        build(recipe, out, workers=workers, address=address, cache_dir=cache_dir, progress=True)
    finally:
        if reaper is not None:  # the build ended on its own (Ray shut down): the reaper is not needed
            reaper.terminate()
            reaper.wait()
        if lock is not None:
            lock.release()
