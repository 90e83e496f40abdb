"""A run folder's checkpoint layout (`RUN/checkpoints/step-XXXXXXXX`, `….tmp` while written): path logic only,
torch-free, so that `mlan train`'s launcher can refuse a fresh start on a used folder before torchrun starts."""
from __future__ import annotations

import shutil
from pathlib import Path

CHECKPOINTS = "checkpoints"


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
