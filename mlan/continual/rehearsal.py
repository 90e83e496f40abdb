"""Rehearsal through the mixture: a seeded, exact sample of each earlier VL task's records, as extra build sources.

The paper keeps a random `fraction` of every previous vision-language task's samples and mixes them into the
current task; the language task is never replayed. Here each source of an earlier VL task gets a fixed
sample of round(fraction × its records), written once to OUT/rehearsal/<task>-<source>.jsonl and added to task
k's build as a source named `rehearsal-<task>` (`rehearsal-<task>-<source>` when the task has several), so the
build's stats and report count it per source. The task's budget (in examples) grows by the replayed count and
the source weights are set so the plan takes every replayed record exactly once.
"""
from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mlan.atomic_write import write_text_atomic
from mlan.continual.spec import ContinualError, RehearsalSpec
from mlan.recipe import Recipe, SourceSpec
from mlan.sources.images import image_root
from mlan.sources.readers import read_records
from mlan.sources.records import RecordError


@dataclass(frozen=True)
class Replay:
    """One replayed sample: the earlier task and source, how many of how many records, and its source entry."""

    task: str
    source: str
    count: int
    of: int
    entry: dict[str, Any]  # an mlan recipe source


def sample_indices(n_records: int, fraction: float, seed: int, key: str) -> np.ndarray:
    """round(fraction × n) distinct record indices in record order; one stream per `key` (task/source)."""
    count = round(fraction * n_records)
    rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
    return np.sort(rng.choice(n_records, size=count, replace=False)) if count else np.zeros(0, np.int64)


def _write_sample(spec: SourceSpec, indices: np.ndarray, target: Path) -> None:
    keep = {int(i) for i in indices}
    lines = []
    for index, record in read_records(spec):
        if index in keep:
            try:
                lines.append(json.dumps(record, ensure_ascii=False))
            except TypeError:
                raise ContinualError(f"source {spec.name!r}, record {index}: not JSON-serializable "
                                     "(rehearsal replays file records; images must be paths)") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(target, "".join(line + "\n" for line in lines), encoding="utf-8")


def replay_sources(rehearsal: RehearsalSpec, earlier: list[tuple[str, Recipe, int]], out: Path) -> list[Replay]:
    """The replay sources for a task, from `earlier` = (task name, its recipe, its own source count) of VL tasks."""
    replays = []
    for task, recipe, n_own in earlier:
        own = recipe.sources[:n_own]
        for src in own:
            usable = [i for i, r in read_records(src) if not isinstance(r, RecordError)]
            key = f"{task}/{src.name}"
            picked = np.asarray(usable, dtype=np.int64)[sample_indices(len(usable), rehearsal.fraction, rehearsal.seed, key)]
            if picked.size == 0:
                continue
            target = out / f"{task}-{src.name}.jsonl"
            if not target.is_file():
                _write_sample(src, picked, target)
            name = f"rehearsal-{task}" if len(own) == 1 else f"rehearsal-{task}-{src.name}"
            entry = {k: v for k, v in src.model_dump(mode="json", exclude_unset=True).items()
                     if k not in ("limit", "split", "subset", "weight", "upsample")}
            entry.update(name=name, path=str(target), images=image_root(src), weight=float(picked.size),
                         upsample=False)
            replays.append(Replay(task, src.name, int(picked.size), len(usable), entry))
    return replays


def with_replay(own_sources: list[dict[str, Any]], budget: dict[str, int], replays: list[Replay],
                task: str) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Own sources reweighted to share the task's budget, then the replays at weight = their count.

    The plan (mlan.mixture.plan) splits a modality's budget by cumulative weight and carries rounding forward,
    so with weights summing to the budget every replay source gets exactly its count.
    """
    if not replays:
        return own_sources, budget
    if "examples" not in budget:
        raise ContinualError(f"tasks.{task}.budget: rehearsal by examples needs the task's budget in examples "
                             f"(got {budget})")
    b = int(budget["examples"])
    total_w = sum(float(s.get("weight", 1.0)) for s in own_sources)
    own = [{**s, "weight": b * float(s.get("weight", 1.0)) / total_w} for s in own_sources]
    return own + [r.entry for r in replays], {"examples": b + sum(r.count for r in replays)}
