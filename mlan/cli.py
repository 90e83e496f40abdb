"""The `mlan` command: parses arguments (mlan/commands/), runs the command, and keeps the error contract:
a user error is one line and exit status 2, never a traceback; SIGTERM, Ctrl-C and a closed stdout end quietly."""
from __future__ import annotations

import os
import signal
import sys
import threading

from mlan.commands import build_parser
from mlan.errors import MlanError, one_line
from mlan.progress import LogSettings


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C so that every `finally` (child process groups) runs."""


def _mark_locks_stopping() -> None:
    run_lock = sys.modules.get("mlan.run_lock")  # a command that holds a lock has imported it; `--help` has not
    if run_lock is not None:
        run_lock.mark_locks_stopping()


def _on_sigterm(signum: int, frame: object) -> None:
    _mark_locks_stopping()
    raise Terminated()


def _on_sigint(signum: int, frame: object) -> None:
    _mark_locks_stopping()
    raise KeyboardInterrupt()


def stop_signals_raise() -> dict[int, object]:
    """SIGTERM and Ctrl-C raise in the main thread (every `finally` runs) after marking this process's output
    locks as stopping, so that a rerun started at once waits for the shutdown instead of refusing the folder.
    Returns the previous handlers."""
    return {signal.SIGTERM: signal.signal(signal.SIGTERM, _on_sigterm),
            signal.SIGINT: signal.signal(signal.SIGINT, _on_sigint)}


# OS errors a user causes by naming a path that is not there or not usable; one line, exit 2 like MlanError.
_PATH_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def error_line(command: str, err: BaseException) -> str:
    """`mlan CMD: error: <message>` on one line (a message that already carries the prefix keeps one)."""
    message = one_line(err)
    prefix = f"mlan {command}: error: "
    message = message.removeprefix(prefix)
    return prefix + message


def _quiet_stdout() -> None:
    """After a closed pipe (`mlan inspect … | head`): point stdout at /dev/null so the final flush is silent."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


# Other libraries' progress bars and expected notices, off unless -v; set in the environment so that torchrun
# workers, Ray workers and pipeline children (which import those libraries themselves) are quiet too.
QUIET_LIBRARIES_ENV = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers' "Loading weights" / "Writing model shards" bars too
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",  # sub-config defaults and other info-level notices
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "DATASETS_VERBOSITY": "error",
    "RAY_DEDUP_LOGS": "1",
}


def apply_output_settings(settings: LogSettings, environ: dict[str, str] | None = None) -> None:
    """Export the output settings for this process and its children; quiet the other libraries unless -v
    (a variable the user set stays as set)."""
    env = os.environ if environ is None else environ
    settings.export(env)
    if not settings.verbose:
        for key, value in QUIET_LIBRARIES_ENV.items():
            env.setdefault(key, value)


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done, 1 a command-specific failure (e.g. `verify` found bad shards), 2 a user error (one
    line on stderr), 130 Ctrl-C, 143 SIGTERM, 141 the reader of stdout went away (quietly)."""
    args = build_parser().parse_args(argv)
    apply_output_settings(LogSettings(format=args.log_format, quiet=args.quiet, verbose=args.verbose))
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = stop_signals_raise() if in_main_thread else {}
    try:
        rc = int(args.handler(args) or 0)
        sys.stdout.flush()
        return rc
    except (MlanError, *_PATH_ERRORS) as err:
        print(error_line(args.command, err), file=sys.stderr)
        return 2
    except BrokenPipeError:
        _quiet_stdout()
        return 128 + signal.SIGPIPE
    except Terminated:
        print(f"mlan {args.command}: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print(f"mlan {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


if __name__ == "__main__":
    sys.exit(main())
