"""A build's packed rows → this rank's batches, in a seeded order, with an exact resume cursor.

The plan is pure arithmetic over the manifest: a seeded permutation of all N rows (one per epoch) is cut
into steps of `world_size × batch_rows` rows; at step t rank r takes rows [t·W·B + r·B, t·W·B + (r+1)·B).
The last step's R rows are dealt as evenly as possible (ranks differ by at most one row), so every rank
runs the same number of batches, ⌈N / (W·B)⌉, and no row is dropped. Only when R < W does a rank get no
real row in the last step; it then gets a *filler* row (a copy of a real row with every label −100,
`meta.filler_rows = 1`, not counted in `meta.n_tokens`), so that all ranks still issue the same
collectives.

Batches are built in DataLoader workers (map-style dataset over this rank's batch indices, so worker w
builds batches w, w + workers, …, and batches come back in order). The cursor is the number of batches
handed to the caller: a loader restored from `state_dict()` yields exactly the batches not yet consumed,
whatever was prefetched.

Shards are WebDataset tars (`mlan.mixture.shards` row format). Rows are read by random access through
an index of each tar's members (offsets from the tar headers; keys split the webdataset way), built
lazily once per process: webdataset 1.0.2 ships no `wids`, and a global permutation needs random access.
"""
from __future__ import annotations

import math
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
from torch.utils.data import DataLoader, Dataset, get_worker_info

from mlan.data.collate import FamilyCollator, check_row_images, family_collate
from mlan.mixture.shards import (
    PackedRow,
    Shard,
    ShardError,
    read_manifest,
    sample_to_row,
    sha256_problem,
    split_key,
)

STATE_VERSION = 1


def verify_shards(shards: list[Shard]) -> None:
    """Recompute every shard's sha256 and compare with the manifest; raises ShardError naming the shard."""
    for shard in shards:
        problem = sha256_problem(shard)
        if problem:
            raise ShardError(problem)


# ---------------------------------------------------------------- the plan
@dataclass(frozen=True)
class BatchPlan:
    """This rank's batches for one epoch: global row indices per batch, and which of them are fillers."""

    rows: list[np.ndarray]
    filler: list[np.ndarray]

    def __len__(self) -> int:
        return len(self.rows)


def plan_batches(n_rows: int, rank: int, world_size: int, batch_rows: int, seed: int, epoch: int = 0) -> BatchPlan:
    """Deal a seeded permutation of `n_rows` rows to ranks in batches; see the module docstring."""
    if n_rows < 1:
        raise ValueError("the build has no rows")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world_size {world_size}")
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be ≥ 1, got {batch_rows}")
    perm = np.random.default_rng([seed, epoch]).permutation(n_rows)
    step = world_size * batch_rows
    n_batches = math.ceil(n_rows / step)
    rows, filler = [], []
    for t in range(n_batches - 1):
        a = t * step + rank * batch_rows
        rows.append(perm[a:a + batch_rows])
        filler.append(np.zeros(batch_rows, dtype=bool))
    last = perm[(n_batches - 1) * step:]
    base, extra = divmod(len(last), world_size)
    sizes = [base + (r < extra) for r in range(world_size)]
    a = sum(sizes[:rank])
    mine = last[a:a + sizes[rank]]
    if len(mine):
        rows.append(mine)
        filler.append(np.zeros(len(mine), dtype=bool))
    else:  # fewer rows than ranks in the last step: same step count everywhere, no loss from the filler
        rows.append(perm[rank % n_rows:rank % n_rows + 1])
        filler.append(np.ones(1, dtype=bool))
    return BatchPlan(rows, filler)


# ---------------------------------------------------------------- reading rows
def index_tar(shard: Shard) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """[(key, {ext: (offset, size)})] in tar order, from the tar headers only."""
    samples: list[tuple[str, dict[str, tuple[int, int]]]] = []
    try:
        with fsspec.open(shard.url, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                key, ext = split_key(m.name)
                if key is None:
                    raise ShardError(f"{shard.name}: member {m.name!r} has no key.extension name")
                if not samples or samples[-1][0] != key:
                    samples.append((key, {}))
                samples[-1][1][ext] = (m.offset_data, m.size)
    except FileNotFoundError as err:
        raise ShardError(f"{shard.name}: shard file missing ({shard.url})") from err
    except (tarfile.TarError, EOFError, OSError) as err:
        raise ShardError(f"{shard.name}: not a readable tar ({type(err).__name__}: {err})") from err
    if len(samples) != shard.rows:
        raise ShardError(f"{shard.name}: holds {len(samples)} rows, the manifest says {shard.rows}")
    return samples


class RowReader:
    """Random access to a build's rows by global index; indexes each tar on first use (per process)."""

    def __init__(self, shards: list[Shard]):
        self.shards = shards
        self.starts = np.cumsum([0] + [s.rows for s in shards])
        self._index: dict[int, list] = {}

    def __len__(self) -> int:
        return int(self.starts[-1])

    def locate(self, g: int) -> tuple[int, int]:
        s = int(np.searchsorted(self.starts, g, side="right")) - 1
        return s, int(g - self.starts[s])

    def shard_name(self, g: int) -> str:
        return self.shards[self.locate(g)[0]].name

    def read(self, g: int) -> PackedRow:
        s, local = self.locate(g)
        shard = self.shards[s]
        if s not in self._index:
            self._index[s] = index_tar(shard)
        key, members = self._index[s][local]
        sample: dict[str, Any] = {"__key__": key}
        try:
            with fsspec.open(shard.url, "rb") as f:
                for ext, (offset, size) in members.items():
                    f.seek(offset)
                    sample[ext] = f.read(size)
                    if len(sample[ext]) != size:
                        raise EOFError(f"member {key}.{ext} truncated")
            row = sample_to_row(sample)
            row.check()
        except ShardError:
            raise
        except Exception as err:  # a damaged member: name the shard and the row, keep the cause
            raise ShardError(f"{shard.name}: row {key!r}: cannot read ({type(err).__name__}: {err})") from err
        return row


class RankBatches(Dataset):
    """Map-style dataset: batch index → the collated batch (rows read, images decoded and processed)."""

    def __init__(self, reader: RowReader, plan: BatchPlan, collate: FamilyCollator):
        self.reader, self.plan, self.collate = reader, plan, collate

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, b: int) -> dict[str, Any]:
        idx = self.plan.rows[b]
        rows = [self.reader.read(int(g)) for g in idx]
        origins = [self.reader.shard_name(int(g)) for g in idx]
        for row, origin in zip(rows, origins):
            try:
                check_row_images(row, self.collate.geometry)
            except ValueError as err:
                raise ShardError(f"{origin}: {err}") from err
        batch = self.collate(rows, filler=self.plan.filler[b], origins=origins)
        info = get_worker_info()
        batch["meta"]["batch_index"] = int(b)
        batch["meta"]["worker"] = info.id if info is not None else 0
        return batch


def _identity(batch: dict[str, Any]) -> dict[str, Any]:
    return batch


# ---------------------------------------------------------------- the loader
class PackedLoader:
    """Iterable of this rank's batches for one epoch; `len()` batches; `state_dict()` is an exact cursor.

    Iterating again after a full pass starts the next epoch (a new seeded permutation). Batches are
    forward arguments plus `meta`; pop `meta` and call the model with `use_cache=False` (packed rows).
    """

    def __init__(self, build_dir: str, manifest: dict[str, Any], reader: RowReader, collate: FamilyCollator,
                 rank: int, world_size: int, batch_rows: int, workers: int, seed: int):
        self.build_dir, self.manifest, self.reader, self.collate = build_dir, manifest, reader, collate
        self.rank, self.world_size, self.batch_rows, self.workers, self.seed = rank, world_size, batch_rows, workers, seed
        self.epoch = 0
        self.consumed = 0
        self._plan = self._make_plan()

    def _make_plan(self) -> BatchPlan:
        return plan_batches(len(self.reader), self.rank, self.world_size, self.batch_rows, self.seed, self.epoch)

    @property
    def family_config(self) -> dict[str, Any]:
        return self.manifest["family_config"]

    def __len__(self) -> int:
        return len(self._plan)

    def plan(self) -> BatchPlan:
        """This epoch's global row indices per batch (for tests and inspection)."""
        return self._plan

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.consumed >= len(self._plan):
            self.epoch += 1
            self.consumed = 0
            self._plan = self._make_plan()
        dataset = RankBatches(self.reader, self._plan, self.collate)
        loader = DataLoader(
            dataset, batch_size=None, sampler=range(self.consumed, len(self._plan)), num_workers=self.workers,
            collate_fn=_identity, prefetch_factor=2 if self.workers > 0 else None,
        )
        for batch in loader:
            self.consumed += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION, "epoch": self.epoch, "consumed": self.consumed, "rank": self.rank,
            "world_size": self.world_size, "batch_rows": self.batch_rows, "seed": self.seed,
            "n_rows": len(self.reader), "fingerprint": self.manifest.get("fingerprint"),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the cursor; refuses a state taken over another build, rank layout, batch size or seed."""
        mine = self.state_dict()
        diffs = [f"{k}: state {state.get(k)!r} vs loader {mine[k]!r}"
                 for k in ("version", "rank", "world_size", "batch_rows", "seed", "n_rows", "fingerprint")
                 if state.get(k) != mine[k]]
        if diffs:
            raise ValueError("loader state does not match this loader (" + "; ".join(diffs) + ")")
        self.epoch = int(state["epoch"])
        self._plan = self._make_plan()
        self.consumed = int(state["consumed"])
        if not 0 <= self.consumed <= len(self._plan):
            raise ValueError(f"loader state: consumed={self.consumed} outside 0..{len(self._plan)}")


def make_loader(build_dir: str, rank: int, world_size: int, batch_rows: int, workers: int, seed: int,
                verify: bool = False, pad_to: str = "longest") -> PackedLoader:
    """This rank's loader over a `mlan build` output; `verify` checks every shard's sha256 first."""
    build_dir = str(build_dir)
    manifest = read_manifest(build_dir)
    shards = manifest.shards
    if verify:
        verify_shards(shards)
    collate = family_collate(manifest.family_config, seq_len=manifest.seq_len, pad_to=pad_to)
    return PackedLoader(build_dir, manifest.data, RowReader(shards), collate, rank, world_size, batch_rows, workers, seed)
