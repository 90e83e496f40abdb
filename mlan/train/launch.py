"""`mlan train`: start torchrun with N local workers running `python -m mlan.commands.train_worker` (one runs
alone, without torchrun), and wait.

Many nodes: run the same worker under torchrun on every node yourself, e.g.
`torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \
   -m mlan.commands.train_worker RECIPE --shards DIR --out RUN` (RUN and DIR on a filesystem all nodes share).
"""
from __future__ import annotations

import os
import socket
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

from mlan.child_process import run_child
from mlan.errors import ERROR_FILE_ENV, MlanError
from mlan.families.model_files import check_model_files
from mlan.mixture.shards import read_manifest
from mlan.mixture.verify import check_build
from mlan.recipe import load_recipe
from mlan.run_lock import lock_output
from mlan.train.budget import resolve_budget
from mlan.train.run_folder import latest_checkpoint


class TrainingFailed(MlanError, RuntimeError):
    """The workers failed; a worker's user error is the message, else the failure summary printed above."""


def worker_command(recipe: str, shards: str, out: str, nproc: int, resume: bool,
                   overrides: Iterable[str], verify: bool = True) -> list[str]:
    """The torchrun command line (through mlan's quiet agent) for one node with `nproc` local workers; one
    worker runs alone, a world of one (torchrun's agent would cost it a second torch start-up and a rendezvous)."""
    launcher = [] if nproc == 1 else ["-m", "mlan.train.node_agent", "--standalone", f"--nproc-per-node={nproc}"]
    cmd = [sys.executable, *launcher,
           "-m", "mlan.commands.train_worker", str(recipe), "--shards", str(shards), "--out", str(out)]
    if resume:
        cmd.append("--resume")
    if not verify:
        cmd.append("--no-verify")
    for o in overrides:
        cmd += ["--set", o]
    return cmd


def world_of_one(port: str | None = None) -> dict[str, str]:
    """The environment torchrun would give a lone worker: rank 0 of 1, its store on `port` (default: a port the
    OS says is free now)."""
    if port is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = str(s.getsockname()[1])
    return {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port}


def preflight(recipe_path: str | Path, shards: str | Path, overrides: Iterable[str], verify: bool = True) -> None:
    """Fail fast, before any worker starts, on a bad recipe, a missing or damaged build or an impossible budget."""
    recipe = load_recipe(recipe_path, list(overrides))
    resolve_budget(recipe.train, read_manifest(str(shards)).data)
    check_model_files(recipe.model)
    if verify:
        check_build(str(shards))


def run_training(recipe_path: str | Path, shards: str | Path, out: str | Path, nproc: int = 2,
                 resume: bool = False, overrides: Iterable[str] = (), verify: bool = True) -> Path:
    """Launch a run on this machine and wait; returns RUN/final (a save_pretrained folder).

    The run folder is locked for the whole run (torchrun inherits the lock, so it is held until the last of
    them is gone); torchrun and its workers die with this process, whatever kills it.
    """
    if nproc < 1:
        raise TrainingFailed(f"--nproc {nproc}: need at least one process")
    preflight(recipe_path, shards, overrides, verify)
    if resume:  # a checkpoint that fails its digest or carries hostile metadata stops here, before any worker
        from mlan.train.checkpoint import check_latest_checkpoint  # lazy: DCP's metadata classes pull torch

        check_latest_checkpoint(Path(out))
    elif (latest := latest_checkpoint(Path(out))) is not None:  # the workers refuse it too; this is seconds sooner
        raise TrainingFailed(f"{out}: has checkpoints ({latest.name}); pass --resume or choose a new --out")
    lock = lock_output(out, "train")
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if nproc == 1:  # no torchrun: the lone worker's world of one, whatever RANK/WORLD_SIZE this shell has
        env.update(world_of_one())
    # the shards were verified above: the workers skip their own check
    cmd = worker_command(str(recipe_path), str(shards), str(out), nproc, resume, overrides, verify=False)
    fd, error_file = tempfile.mkstemp(prefix="mlan-train-", suffix=".err")
    os.close(fd)
    env[ERROR_FILE_ENV] = error_file
    try:
        rc = run_child(cmd, env=env, pass_fds=(lock.fileno(),) if lock is not None else ())
        with open(error_file, encoding="utf-8") as f:
            reported = f.readline().strip()
    finally:
        os.unlink(error_file)
        if lock is not None:
            lock.release()
    if reported:
        raise TrainingFailed(reported)
    if rc != 0:
        raise TrainingFailed(f"workers exited with status {rc} (their output is above; command: {' '.join(cmd)})")
    return Path(out) / "final"
