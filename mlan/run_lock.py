"""One writer per output folder: `mlan build` and `mlan train` lock their `--out` before writing anything.

The lock is an advisory `flock` on `OUT/.mlan.lock`. The kernel drops it when the holding process dies, even
by SIGKILL, so a lock whose process is gone is simply free again: the next run takes it over and says so
(the file still names the dead holder). The file's content (pid, host, command, start time) is only for the
message a refused second run prints, and for one more thing: a holder that got SIGTERM or Ctrl-C marks its
record `stopping`, and a run that finds such a holder waits for its shutdown (a killed pipeline's child
stopping Ray or torchrun takes seconds) instead of refusing a folder that is about to be free. Remote (fsspec
URL) outputs are not locked: flock needs a local file.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Self

from mlan.errors import LockError

LOCK_FILE = ".mlan.lock"
STOPPING_WAIT_S = 120.0  # a stopping holder gives its children 20 s grace; Ray's shutdown adds seconds more

_HELD: list[RunLock] = []  # this process's locks, for the signal handler that marks them stopping


def mark_locks_stopping() -> None:
    """Mark every lock this process holds as stopping (called from the SIGTERM / Ctrl-C handler)."""
    for lock in _HELD:
        lock.mark_stopping()


def _read_holder(fd: int) -> dict[str, Any]:
    os.lseek(fd, 0, os.SEEK_SET)
    data = b""
    while chunk := os.read(fd, 4096):
        data += chunk
    try:
        holder = json.loads(data.decode()) if data else {}
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "another process"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return f"`mlan {holder.get('command', '?')}` (pid {holder.get('pid', '?')} on {holder.get('host', '?')}, since {since})"


def _wait_for_release(fd: int, timeout_s: float) -> bool:
    """Poll for the lock on `fd` for up to `timeout_s`; True once it is ours."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        time.sleep(0.1)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            continue
    return False


class RunLock:
    """An exclusive lock on one output folder, held from `acquire()` until `release()` or process death."""

    def __init__(self, folder: str | Path, command: str, wait: bool = False):
        self.folder = Path(folder)
        self.command = command
        self.wait = wait  # block until the holder is done (a shared cache) instead of refusing (an output folder)
        self.path = self.folder / LOCK_FILE
        self.fd: int | None = None
        self.took_over: dict[str, Any] | None = None  # the dead holder's record, when the lock was stale
        self.record: dict[str, Any] = {}

    def acquire(self) -> Self:
        """Take the lock or raise LockError naming the folder and the live holder; notice on a stale takeover."""
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                stopping = bool(holder.get("stopping"))
                if stopping:
                    print(f"mlan {self.command}: {self.folder}: waiting for the stopped {_describe(holder)} to finish "
                          "shutting down", file=sys.stderr)
                if stopping and _wait_for_release(fd, STOPPING_WAIT_S):
                    pass  # the stopped holder is gone and we hold the lock
                elif self.wait:
                    print(f"mlan {self.command}: {self.folder}: waiting for {_describe(holder)} to finish with it",
                          file=sys.stderr)
                    fcntl.flock(fd, fcntl.LOCK_EX)
                else:
                    os.close(fd)
                    raise LockError(f"{self.folder}: in use by {_describe(holder)}; wait for it to finish or stop "
                                    "it (one writer per folder)") from None
            try:
                same_file = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same_file = False
            if same_file:
                break
            os.close(fd)  # the previous holder unlinked it between our open and flock: lock the new file
        previous = _read_holder(fd)
        if previous:  # a holder that released cleanly removes the file: this one died holding it
            self.took_over = previous
            print(f"mlan {self.command}: {self.folder}: took over the lock of {_describe(previous)}, "
                  "which is no longer running", file=sys.stderr)
        record = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command, "started": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        self.fd = fd
        self.record = record
        _HELD.append(self)
        return self

    def mark_stopping(self) -> None:
        """Say in the lock file that this holder is shutting down (see the module docstring)."""
        if self.fd is not None:
            data = json.dumps({**self.record, "stopping": time.time()}).encode()
            os.pwrite(self.fd, data, 0)
            os.ftruncate(self.fd, len(data))

    def fileno(self) -> int:
        if self.fd is None:
            raise RuntimeError("lock not held")
        return self.fd

    def release(self) -> None:
        """Remove the file (so the next holder sees no stale record), then drop the lock."""
        if self.fd is None:
            return
        if self in _HELD:
            _HELD.remove(self)
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> Self:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_output(out: str | Path, command: str) -> RunLock | None:
    """Lock a local output folder (a RunLock to release), or None for a remote fsspec URL (not lockable)."""
    text = str(out)
    if "://" in text and not text.startswith("file://"):
        return None
    return RunLock(Path(text.removeprefix("file://")), command).acquire()
