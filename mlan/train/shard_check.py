"""Pre-flight of a training run: the build's manifest is sound and every shard's sha256 matches it.

Run before step 1 (by `mlan train` before torchrun starts; by a bare worker on rank 0 unless --no-verify),
so a flipped byte, a truncated or missing shard stops the run in seconds with one line naming the shard,
instead of training on it or failing mid-run on one rank. Shards are hashed in parallel threads
(hashlib releases the GIL on large blocks).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mlan.mixture.shards import ManifestError, Shard, ShardError, read_manifest, sha256_problem


def verify_build(build_dir: str | Path, threads: int | None = None) -> int:
    """Raise ManifestError / ShardError (one line, naming the first bad shard) or return the shard count."""
    build_dir = str(build_dir)
    manifest = read_manifest(build_dir)
    shards: list[Shard] = manifest.shards
    if not shards:
        raise ManifestError(f"{build_dir}/manifest.json: lists no shards")
    totals = manifest.totals
    rows = sum(s.rows for s in shards)
    if "rows" in totals and int(totals["rows"]) != rows:
        raise ManifestError(f"{build_dir}/manifest.json: totals.rows {totals['rows']} != {rows}, the sum over shards")
    n_threads = threads or min(len(shards), max(2, os.cpu_count() or 1), 16)
    with ThreadPoolExecutor(max_workers=n_threads) as pool:
        problems = [p for p in pool.map(sha256_problem, shards) if p is not None]
    if problems:
        more = f" ({len(problems)} of {len(shards)} shards bad; `mlan verify {build_dir}` lists them)" \
            if len(problems) > 1 else ""
        raise ShardError(problems[0] + more)
    return len(shards)
