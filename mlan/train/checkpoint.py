"""Checkpoint folders with torch.distributed.checkpoint (DCP), the RNG states they hold, and the gathered weights
the export writes.

One checkpoint = one DCP folder `RUN/checkpoints/step-XXXXXXXX` holding the Stateful objects of
mlan/train/state.py: the sharded model and optimizer state, the replicated train state (step, token
counters) and schedule and, under a per-rank key, each rank's loader cursor and RNG states. A folder is written as `….tmp` and renamed by rank 0 once every
rank has finished, so a run killed mid-save resumes from the previous complete checkpoint; the leftover
`.tmp` folder is removed when the next run starts, and a step folder that already exists is replaced.

No code from data (design.md invariant 6): DCP unpickles a checkpoint's `.metadata` and `torch.load`s its
non-tensor entries with `weights_only=False`, so a crafted checkpoint folder would run code on resume. mlan
writes `mlan-digest.json` (the sha256 of every file, written last) into each checkpoint and refuses a folder
whose digest is missing or does not match before reading anything else; it then reads `.metadata` with an
unpickler that admits only DCP's metadata classes and the torch types they hold, and the non-tensor entries
with `weights_only=True`. A folder an attacker rewrote digest and all still cannot run code.
"""
from __future__ import annotations

import ast
import hashlib
import io
import json
import pathlib
import pickle
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.distributed.checkpoint.metadata as dcp_metadata
from torch import nn
from torch.distributed.checkpoint import CheckpointException, DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from mlan.atomic_write import write_text_atomic
from mlan.errors import MlanError
from mlan.train.run_folder import checkpoint_dir, latest_checkpoint

DIGEST = "mlan-digest.json"
_METADATA = ".metadata"


class CheckpointError(MlanError):
    """A checkpoint folder mlan will not load: no digest, a file that does not match it, hostile metadata."""


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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def write_digest(folder: Path) -> Path:
    """Record the sha256 of every file of a finished checkpoint folder (written last, atomically)."""
    files = {p.name: _sha256(p) for p in sorted(Path(folder).iterdir()) if p.is_file() and p.name != DIGEST}
    target = Path(folder) / DIGEST
    write_text_atomic(target, json.dumps({"sha256": files}, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return target


def check_digest(folder: Path) -> None:
    """Raise CheckpointError (one line naming the file) unless every file of `folder` matches its digest."""
    folder = Path(folder)
    digest_path = folder / DIGEST
    try:
        recorded = json.loads(digest_path.read_text(encoding="utf-8"))["sha256"]
        if not isinstance(recorded, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                     for k, v in recorded.items()):
            raise ValueError("sha256 is not a {file: hex} table")
    except FileNotFoundError:
        raise CheckpointError(f"{digest_path}: missing; mlan writes it with every checkpoint and will not load "
                              "a checkpoint folder without it") from None
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, RecursionError) as err:
        raise CheckpointError(f"{digest_path}: unreadable ({type(err).__name__}: {err})") from None
    if _METADATA not in recorded:
        raise CheckpointError(f"{digest_path}: lists no {_METADATA}")
    present = {p.name for p in folder.iterdir() if p.is_file() and p.name != DIGEST}
    for name in sorted(present - set(recorded)):
        raise CheckpointError(f"{folder / name}: not in {DIGEST} (a file added to the checkpoint)")
    for name, want in sorted(recorded.items()):
        path = folder / name
        if Path(name).name != name or name in (".", ".."):
            raise CheckpointError(f"{digest_path}: {name!r} is not a plain file name")
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (listed in {DIGEST})")
        if _sha256(path) != want:
            raise CheckpointError(f"{path}: sha256 does not match {DIGEST} (changed since mlan wrote it)")


def _is_dcp_metadata_class(module: str, name: str) -> bool:
    if module == dcp_metadata.__name__:
        obj = getattr(dcp_metadata, name, None)
        return isinstance(obj, type) and obj.__module__ == module
    return (module, name) == (_StorageInfo.__module__, _StorageInfo.__name__)


class MetadataUnpickler(pickle.Unpickler):
    """Admits only what a DCP `.metadata` holds: its metadata dataclasses, torch dtypes/Size/layouts, paths."""

    def find_class(self, module: str, name: str) -> Any:
        if _is_dcp_metadata_class(module, name):
            return super().find_class(module, name)
        if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
            return getattr(torch, name)
        if (module, name) == ("torch.serialization", "_get_layout"):
            return super().find_class(module, name)
        if module == "pathlib" and name in ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"):
            return getattr(pathlib, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not a checkpoint metadata type")


def read_metadata_file(path: Path) -> dcp_metadata.Metadata:
    """A DCP `.metadata` through MetadataUnpickler; every storage entry must name a plain file of its folder."""
    try:
        with open(path, "rb") as f:
            metadata = MetadataUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError, KeyError, IndexError,
            ImportError, RecursionError, MemoryError, OSError) as err:
        raise CheckpointError(f"{path}: not a checkpoint's metadata ({type(err).__name__}: {err})") from None
    if not isinstance(metadata, dcp_metadata.Metadata):
        raise CheckpointError(f"{path}: not a checkpoint's metadata (a {type(metadata).__name__})")
    storage = metadata.storage_data if isinstance(metadata.storage_data, dict) else {}
    for info in storage.values():
        name = getattr(info, "relative_path", None)
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise CheckpointError(f"{path}: a storage entry names {name!r}, not a file of the checkpoint folder")
    return metadata


class CheckedReader(FileSystemReader):
    """DCP's file reader with `.metadata` read by MetadataUnpickler instead of pickle.load."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        metadata = read_metadata_file(Path(self._get_metadata_path(kwargs.get("rank"))))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class CheckedLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner with non-tensor entries read by `torch.load(weights_only=True)` (plain values only)."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        try:
            loaded = torch.load(value, weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
            raise CheckpointError(f"checkpoint entry {read_item.dest_index.fqn}: not a plain value "
                                  f"({type(err).__name__}: torch.load(weights_only=True) refused it)") from err
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


def check_checkpoint(folder: Path) -> None:
    """Everything a resume checks before DCP reads the folder: the digest, then the metadata's types."""
    check_digest(folder)
    read_metadata_file(Path(folder) / _METADATA)


def check_latest_checkpoint(run_dir: Path) -> Path | None:
    """Check the checkpoint a `--resume` would load (the launcher's preflight, before any worker starts)."""
    latest = latest_checkpoint(run_dir)
    if latest is not None:
        check_checkpoint(latest)
    return latest


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
        write_digest(tmp)
        if final.exists():  # the same step written by an earlier (killed) run: this one replaces it
            shutil.rmtree(final)
        tmp.rename(final)
        older = sorted(p for p in final.parent.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
        for old in older[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Collective: restore every Stateful object of `state` in place from the checkpoint folder, once rank 0
    has checked it (check_checkpoint); a bad folder is the same CheckpointError on every rank."""
    problem: list[str | None] = [None]
    if dist.get_rank() == 0:
        try:
            check_checkpoint(path)
        except CheckpointError as err:
            problem[0] = str(err)
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(problem, src=0)
    if problem[0] is not None:
        raise CheckpointError(problem[0])
    try:
        dcp.load(state, storage_reader=CheckedReader(path), planner=CheckedLoadPlanner())
    except CheckpointError:
        raise
    except MlanError as err:  # a Stateful refused what it was handed (mlan.train.state): name the checkpoint
        raise type(err)(f"{path}: {err}") from None
    except CheckpointException as err:  # DCP gathers every rank's failure: ours is one line, the rest not ours
        for exc, _trace in err.failures.values():
            if isinstance(exc, CheckpointError):
                raise CheckpointError(f"{path}: {exc}") from None
        raise


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Collective: the unsharded fp32 state dict, on CPU, on rank 0 (empty elsewhere)."""
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts)
