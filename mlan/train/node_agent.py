"""torchrun for `mlan train`: the same elastic agent, minus its multi-screen failure report for user errors.

When a worker stops on a user error (a damaged shard, a bad recipe key) it writes one line to the file
named by MLAN_ERROR_FILE and exits 2; torchrun would then print a ChildFailedError traceback and a table for
it, and the other ranks (cut off mid-collective) their own tracebacks. This agent runs torchrun's `run()`
in-process and stays quiet in that case: the launcher prints the one line. Any other failure is summarised
with each failed rank's exit status (the worker's own traceback is above it).
"""
from __future__ import annotations

import logging
import os
import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run

from mlan.errors import ERROR_FILE_ENV


def reported_error() -> str | None:
    """The first line a worker wrote to the error file, if any."""
    path = os.environ.get(ERROR_FILE_ENV)
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            first = f.readline().strip()
    except FileNotFoundError:
        return None
    return first or None


def quiet_elastic_logs() -> None:
    """torchrun's "Sending process … closing signal" / "failed (exitcode: 2)" lines: noise next to the one line
    (a user error) or to the worker's own traceback and the summary below (anything else)."""
    for name in list(logging.root.manager.loggerDict):
        if name.startswith(("torch.distributed.elastic", "torch.distributed.run", "torch.distributed.launcher")):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def main(argv: list[str]) -> int:
    quiet_elastic_logs()
    try:
        run(parse_args(argv))
    except ChildFailedError as err:
        if reported_error() is not None:
            return 2
        codes = ", ".join(f"rank {rank}: status {f.exitcode}" for rank, f in sorted(err.failures.items()))
        print(f"mlan train: workers failed ({codes})", file=sys.stderr)
        return 1
    except SignalException as err:  # torchrun has already stopped its workers
        return 128 + int(err.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
