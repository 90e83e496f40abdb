"""`mlan train`: start torchrun with N local workers running `python -m mlan.train.trainer`, and wait.

Many nodes: run the same worker under torchrun on every node yourself, e.g.
`torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \
   -m mlan.train.trainer RECIPE --shards DIR --out RUN` (RUN and DIR on a filesystem all nodes share).
"""
from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path


class TrainingFailed(RuntimeError):
    """A worker exited non-zero; its own error was printed above."""


def worker_command(recipe: str, shards: str, out: str, nproc: int, resume: bool,
                   overrides: Iterable[str]) -> list[str]:
    """The torchrun command line for one node with `nproc` local workers."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "mlan.train.trainer", str(recipe), "--shards", str(shards), "--out", str(out)]
    if resume:
        cmd.append("--resume")
    for o in overrides:
        cmd += ["--set", o]
    return cmd


def preflight(recipe_path: str | Path, shards: str | Path, overrides: Iterable[str]) -> None:
    """Fail fast, before any worker starts, on a bad recipe, a missing build or an impossible budget."""
    from mlan.recipe import load_recipe
    from mlan.train.trainer import read_manifest, resolve_budget

    recipe = load_recipe(recipe_path, list(overrides))
    resolve_budget(recipe.train, read_manifest(str(shards)))


def run_training(recipe_path: str | Path, shards: str | Path, out: str | Path, nproc: int = 2,
                 resume: bool = False, overrides: Iterable[str] = ()) -> Path:
    """Launch a run on this machine and wait; returns RUN/final (a save_pretrained folder)."""
    if nproc < 1:
        raise ValueError(f"--nproc {nproc}: need at least one process")
    preflight(recipe_path, shards, overrides)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    cmd = worker_command(str(recipe_path), str(shards), str(out), nproc, resume, overrides)
    rc = subprocess.call(cmd, env=env)
    if rc != 0:
        raise TrainingFailed(f"mlan train: workers exited with status {rc} (command: {' '.join(cmd)})")
    return Path(out) / "final"


def train_command(args) -> int:
    """cli.py dispatches `mlan train RECIPE --shards DIR --out RUN [--nproc N] [--resume] [--set K=V]` here."""
    from mlan.data.loader import ManifestError

    try:
        final = run_training(args.recipe, args.shards, args.out, nproc=args.nproc, resume=args.resume,
                             overrides=args.overrides)
    except TrainingFailed as err:
        print(err, file=sys.stderr)
        return 1
    except ManifestError as err:  # a manifest that breaks the build-output contract (RecipeError: cli.py)
        print(f"mlan train: error: {err}", file=sys.stderr)
        return 2
    print(f"mlan train: exported {final}")
    return 0
