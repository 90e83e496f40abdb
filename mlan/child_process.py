"""Child processes that never outlive the `mlan` command that started them.

`mlan train` → torchrun → workers (→ DataLoader workers), and `mlan ablate` → `mlan build` / `mlan train`:
when the parent dies by SIGKILL no `finally` runs, so each link is tied to its parent by the kernel or a
thread:
- `run_child` starts a child in its own process group with PR_SET_PDEATHSIG (the kernel signals the child
  when this process dies, SIGKILL included) and, on Ctrl-C or SIGTERM here, terminates the child's group,
  then kills it after a grace period;
- `start_parent_watchdog` (in processes started by a third party, e.g. torchrun's workers, which run in their
  own sessions) polls the parent pid and exits the process when the parent is gone.
- `start_descendant_reaper` (for `mlan build`, whose local Ray cluster starts agents that outlive a killed
  driver by minutes) runs a small process that keeps a list of this process's descendants and, when this
  process is gone, terminates every one of them still running.
DataLoader workers already exit when their parent is gone (PyTorch's own watchdog).
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

PR_SET_PDEATHSIG = 1  # linux/prctl.h
# loaded here, not between fork and exec (where only async-signal-safe work belongs)
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _set_parent_death_signal(sig: int, parent: int) -> None:
    """In the child between fork and exec: get `sig` when the parent dies; exit now if it already has."""
    if _LIBC is not None:
        _LIBC.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl: no signal will ever come
        os._exit(1)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def run_child(cmd: Sequence[str], env: dict[str, str] | None = None, pass_fds: Sequence[int] = (),
              death_signal: int = signal.SIGTERM, grace_s: float = 20.0) -> int:
    """Run `cmd` to completion in its own process group, tied to this process; returns its exit status.

    `death_signal` is what the child gets when this process dies without cleaning up (SIGTERM lets torchrun
    stop its workers in order). On KeyboardInterrupt (Ctrl-C, or SIGTERM turned into one by the CLI) the
    child's group gets SIGTERM, then SIGKILL after `grace_s`, and the exception goes on up.
    """
    parent = os.getpid()
    # preexec_fn runs one prctl through a libc handle loaded at import and a getppid: no locks, no imports,
    # so the fork-with-threads hazard ruff warns of does not apply; nothing else can set a parent-death signal.
    proc = subprocess.Popen(list(cmd), env=env, pass_fds=tuple(pass_fds), start_new_session=True,
                            preexec_fn=lambda: _set_parent_death_signal(death_signal, parent))  # noqa: PLW1509
    try:
        return proc.wait()
    except BaseException:
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
        except KeyboardInterrupt:  # a second Ctrl-C: no more grace
            pass
        _signal_group(proc.pid, signal.SIGKILL)
        proc.wait()
        raise


def proc_start(pid: int) -> str | None:
    """Start time of a live, non-zombie process (field 22 of /proc/PID/stat): with the pid, names one process."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else fields[19]


def descendants(pid: int) -> set[tuple[int, str]]:
    """(pid, start time) of every live process below `pid`, from the parent links in /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out: set[tuple[int, str]] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            start = proc_start(child)
            if start is not None:
                out.add((child, start))
            todo.append(child)
    return out


def alive(procs: set[tuple[int, str]]) -> set[tuple[int, str]]:
    """Those of `procs` (pid, start time) that are still the same live processes."""
    return {(p, s) for p, s in procs if proc_start(p) == s}


def reap_descendants_of(parent: int, interval_s: float = 0.5, grace_s: float = 2.0) -> None:
    """Body of the reaper process: track `parent`'s descendants; once it is gone, SIGTERM then SIGKILL them."""
    me = os.getpid()
    seen: set[tuple[int, str]] = set()
    while proc_start(parent) is not None and os.getppid() == parent:
        seen = {(p, s) for p, s in seen if proc_start(p) == s} | {(p, s) for p, s in descendants(parent) if p != me}
        time.sleep(interval_s)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        left = [p for p, s in seen if proc_start(p) == s]
        for pid in left:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        if not left:
            return
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(proc_start(p) == s for p, s in seen):
            time.sleep(0.1)


def start_descendant_reaper() -> subprocess.Popen | None:
    """Start the reaper for this process (Linux /proc only; elsewhere None). It exits after this process."""
    if not Path("/proc/self/stat").exists():
        return None
    return subprocess.Popen([sys.executable, "-m", "mlan.child_process", str(os.getpid())],
                            stdin=subprocess.DEVNULL, start_new_session=True)


def start_parent_watchdog(interval_s: float = 0.5, exit_code: int = 143) -> threading.Thread:
    """A daemon thread that ends this process (os._exit) as soon as its parent process is gone.

    Used by torchrun's workers: torchrun starts them in sessions of their own with no parent-death signal,
    so a torchrun killed by SIGKILL would leave them training. Reparenting (getppid changes) is the sign.
    """
    parent = os.getppid()

    def watch() -> None:
        while True:
            if os.getppid() != parent:
                print(f"mlan: worker {os.getpid()}: parent process {parent} is gone; exiting", file=sys.stderr)
                sys.stderr.flush()
                os._exit(exit_code)
            time.sleep(interval_s)

    thread = threading.Thread(target=watch, name="mlan-parent-watchdog", daemon=True)
    thread.start()
    return thread


if __name__ == "__main__":  # the reaper process: `python -m mlan.child_process PARENT_PID`
    reap_descendants_of(int(sys.argv[1]))
