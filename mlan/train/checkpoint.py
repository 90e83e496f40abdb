"""Checkpoint folders with torch.distributed.checkpoint (DCP), the RNG states they hold, and the gathered weights
the export writes.

One checkpoint = one DCP folder `RUN/checkpoints/step-XXXXXXXX` holding the Stateful objects of
mlan/train/state.py: the sharded model and optimizer state, the replicated train state (step, token
counters) and schedule and, under a per-rank key, each rank's loader cursor and RNG states. A folder is written as `….tmp` and renamed by rank 0 once every
rank has finished, so a run killed mid-save resumes from the previous complete checkpoint; the leftover
`.tmp` folder is removed when the next run starts, and a step folder that already exists is replaced.
"""
from __future__ import annotations

import ast
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

CHECKPOINTS = "checkpoints"


def rng_state() -> dict[str, Any]:
    """Every generator a step can draw from (dropout, loader shuffles)."""
    state = {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(np.frombuffer(
            np.array(np.random.get_state()[1], dtype=np.uint32).tobytes(), dtype=np.uint8).copy()),
        "numpy_pos": int(np.random.get_state()[2]),
        "python": repr(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    keys = np.frombuffer(state["numpy"].numpy().tobytes(), dtype=np.uint32)
    np.random.set_state(("MT19937", keys, int(state["numpy_pos"]), 0, 0.0))
    random.setstate(_python_rng(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _python_rng(text: str) -> tuple:
    """`random.getstate()` back from its repr(): parsed as a literal (never evaluated) and shape-checked."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        value = None
    ok = (isinstance(value, tuple) and len(value) == 3 and isinstance(value[0], int)
          and isinstance(value[1], tuple) and all(isinstance(x, int) for x in value[1]))
    if not ok:
        raise ValueError("checkpoint: the Python RNG state is not random.getstate()'s (version, ints, gauss)")
    return value


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step-{step:08d}"


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint folder of a run (unfinished `.tmp` folders are ignored)."""
    root = Path(run_dir) / CHECKPOINTS
    done = sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
    return done[-1] if done else None


def remove_unfinished(run_dir: Path) -> list[Path]:
    """Delete the `step-*.tmp` folders a killed run left behind (the caller holds the run's lock)."""
    gone = sorted(p for p in (Path(run_dir) / CHECKPOINTS).glob("step-*.tmp") if p.is_dir())
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone


def save_checkpoint(run_dir: Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Collective: every rank calls it at the same step with its Stateful objects (mlan.train.state)."""
    rank = dist.get_rank()
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0 and tmp.exists():
        shutil.rmtree(tmp)
    dist.barrier()
    dcp.save(state, checkpoint_id=str(tmp))
    dist.barrier()
    if rank == 0:
        if final.exists():  # the same step written by an earlier (killed) run: this one replaces it
            shutil.rmtree(final)
        tmp.rename(final)
        older = sorted(p for p in final.parent.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
        for old in older[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Collective: restore every Stateful object of `state` in place from the checkpoint folder."""
    dcp.load(state, checkpoint_id=str(path))


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Collective: the unsharded fp32 state dict, on CPU, on rank 0 (empty elsewhere)."""
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts)
