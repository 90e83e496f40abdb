"""Training-free task-vector merging of a VLM's language tower with its base LLM: the package's public API.

tensors: checkpoint I/O · select: streamed top-K by magnitude · merge: one merge · sweep: a grid of merges, scored.
"""
from mlan.merge.merge import (
    Direction,
    MergeConfig,
    MergePlan,
    MergeReport,
    Scope,
    merge_checkpoints,
    plan_merge,
)
from mlan.merge.select import MagnitudeCut, find_cut, keep_count
from mlan.merge.sweep import SweepSpec, merge_sweep, plot_sweep, sweep_table
from mlan.merge.tensors import MergeError, ShardReader, TensorEntry, read_checkpoint, resolve_checkpoint

__all__ = [
    "Direction", "MagnitudeCut", "MergeConfig", "MergeError", "MergePlan", "MergeReport", "Scope", "ShardReader",
    "SweepSpec", "TensorEntry", "find_cut", "keep_count", "merge_checkpoints", "merge_sweep", "plan_merge", "plot_sweep", "read_checkpoint", "resolve_checkpoint", "sweep_table",
]
