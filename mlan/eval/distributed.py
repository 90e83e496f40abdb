"""`mlan eval --nproc N`: the items of every task split across N processes (torch.distributed: gloo on CPU,
NCCL on GPU), started by torchrun through mlan's quiet agent as `mlan train` starts its workers.

Rank r scores items r, r + N, r + 2N, … of each task; the records are gathered in item order, so the results
and the per-item file are those of one process (log-likelihoods equal up to float rounding of other batch
shapes). Rank 0 writes them to a file the launcher reads back; a worker's user error is one line (exit 2).
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from mlan.child_process import run_child
from mlan.errors import ERROR_FILE_ENV, UserError

WORKER_MODULE = "mlan.eval.distributed"


def evaluate_distributed(model: str, tasks: list, nproc: int, **kwargs: Any) -> dict:
    """`evaluate(model, tasks, keep_records=True, **kwargs)` with the items split across `nproc` processes."""
    from mlan.eval.harness import load_tasks

    load_tasks(tasks, kwargs.get("limit"), kwargs.get("images"), kwargs.get("image_pattern"),
               kwargs.get("protocol", "lm-eval"), kwargs.get("items"))  # fail fast, before any process starts
    spec_tasks = [str(t) if isinstance(t, (str, Path)) else t for t in tasks]
    if any(not isinstance(t, (str, dict)) for t in spec_tasks):
        raise UserError("--nproc takes task files, NAME=PATH pairs or task dicts")
    with tempfile.TemporaryDirectory(prefix="mlan-eval-") as tmp:
        spec, out, error_file = Path(tmp) / "spec.json", Path(tmp) / "results.json", Path(tmp) / "error"
        items = kwargs.get("items")
        spec.write_text(json.dumps({"model": str(model), "tasks": spec_tasks, "out": str(out),
                                    "kwargs": {**kwargs, "items": str(items) if items is not None else None}}))
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        env[ERROR_FILE_ENV] = str(error_file)
        cmd = [sys.executable, "-m", "mlan.train.node_agent", "--standalone", f"--nproc-per-node={nproc}",
               "-m", WORKER_MODULE, str(spec)]
        rc = run_child(cmd, env=env)
        reported = error_file.read_text(encoding="utf-8").strip() if error_file.is_file() else ""
        if reported:
            raise UserError(reported.splitlines()[0])
        if rc != 0 or not out.is_file():
            raise UserError(f"mlan eval --nproc {nproc}: workers exited with status {rc} (their output is above)")
        return json.loads(out.read_text())


def _scorer(rank: int, world: int):
    """score_task over this rank's share of a task's items, the shares gathered back in item order."""
    import torch.distributed as dist

    from mlan.eval.harness import score_task

    def score(lm, task, batch_size, max_new_tokens, progress, chat_template) -> list[dict]:
        share = replace(task, items=task.items[rank::world])
        mine = score_task(lm, share, batch_size, max_new_tokens, progress, chat_template) if share.items else []
        shares: list[Any] = [None] * world
        dist.all_gather_object(shares, mine)
        return [shares[k % world][k // world] for k in range(len(task.items))]

    return score


def worker(spec_path: str) -> int:
    """One rank: load the model, score its share, gather; rank 0 writes the results with their records."""
    import torch
    import torch.distributed as dist

    from mlan.eval.harness import evaluate_tasks, load_model, load_tasks

    spec = json.loads(Path(spec_path).read_text())
    kw = spec["kwargs"]
    if torch.cuda.is_available():  # NCCL's collectives (the gather of the records) run on this rank's GPU
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        tasks = load_tasks(spec["tasks"], kw.get("limit"), kw.get("images"), kw.get("image_pattern"),
                           kw.get("protocol", "lm-eval"), kw.get("items"))
        lm = load_model(spec["model"])
        scored = evaluate_tasks(lm, tasks, kw.get("batch_size", 8), kw.get("max_new_tokens", 64), True,
                                chat_template=kw.get("chat_template", False), score=_scorer(rank, world),
                                progress=None if rank == 0 else (lambda name, done, total: None))
        if rank == 0:
            from mlan.eval.harness import with_reference

            results = {"model": spec["model"], "protocol": kw.get("protocol", "lm-eval"),
                       "chat_template": kw.get("chat_template", False), **scored}
            results = with_reference(results, kw.get("reference"))
            Path(spec["out"]).write_text(json.dumps(results))
    except UserError as err:
        if rank == 0 and os.environ.get(ERROR_FILE_ENV):
            Path(os.environ[ERROR_FILE_ENV]).write_text(str(err) + "\n")
        return 2
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(worker(sys.argv[1]))
