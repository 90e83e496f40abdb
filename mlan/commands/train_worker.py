"""The training worker, one per rank, that `mlan train` starts under torchrun (`python -m
mlan.commands.train_worker RECIPE --shards DIR --out RUN`); on many nodes, run it under torchrun yourself.

A user error becomes one line (to the launcher's error file, else stderr) and exit status 2; a bug keeps
its traceback.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch.distributed as dist

from mlan.child_process import start_parent_watchdog
from mlan.errors import ERROR_FILE_ENV, MlanError, one_line
from mlan.train.node_agent import reported_error
from mlan.train.trainer import train


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mlan.commands.train_worker",
                                description="mlan training worker (run under torchrun; see `mlan train`)")
    p.add_argument("recipe")
    p.add_argument("--shards", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--no-verify", action="store_true", help="skip the shard sha256 check before step 1")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    return p


def report_error(message: str) -> None:
    """One line for the user: to the launcher's error file under `mlan train` (it prints it once), else stderr."""
    path = os.environ.get(ERROR_FILE_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as f:  # O_APPEND: the first rank's line stays first
            f.write(message + "\n")
    else:
        print(f"mlan train: error: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Exit status 0 done, 2 a user error (this rank's, or a peer's that cut this rank's collective)."""
    args = build_parser().parse_args(argv)
    if "TORCHELASTIC_RUN_ID" in os.environ:  # under torchrun: exit when torchrun is gone (it may be SIGKILLed)
        start_parent_watchdog()
    rc = 0
    try:
        train(args.recipe, args.shards, args.out, args.resume, args.overrides, verify=not args.no_verify)
    except (MlanError, FileNotFoundError, NotADirectoryError, PermissionError) as err:
        report_error(one_line(err))  # a damaged shard, row or image, a bad key: one line naming it, exit 2
        rc = 2
    except Exception:
        if reported_error() is None:
            raise  # a bug: keep the traceback
        rc = 2  # a peer rank stopped on a user error and cut this rank's collective: it has said why
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return rc


if __name__ == "__main__":
    code = main()
    # A torchrun worker whose work is done and flushed leaves at once: C++ threads of the process group or
    # the loader torn down during interpreter finalization can abort ("terminate called without an active
    # exception") and turn a finished run into a failed one.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
