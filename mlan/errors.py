"""The error contract: every error a user can cause derives from `MlanError`.

A leaf module (imports nothing from mlan) so that any layer can raise these without importing the command
layer. The command layer prints `mlan CMD: error: <message>` on one line and exits with status 2.
"""
from __future__ import annotations

ERROR_FILE_ENV = "MLAN_ERROR_FILE"  # a torchrun worker writes its one-line user error to this file

class MlanError(Exception):
    """An error caused by the user's input (a file, record, recipe key, shard or model); one line, exit 2.

    `where` names the thing at fault (a path, `file:record:field`, a key path, a shard) when the message
    itself does not start with it; the message is always complete on its own.
    """

    def __init__(self, message: str = "", *, where: str | None = None) -> None:
        super().__init__(message)
        self.where = where


class UserError(MlanError):
    """A generic bad-input error raised by a command (wrong argument, missing file)."""


class LockError(MlanError):
    """Another live `mlan` process holds the output folder's lock; the message names the folder and the holder."""


class WeightsError(MlanError):
    """A model folder whose weights mlan will not load (pickle only, a corrupt or hostile safetensors header)."""


def one_line(err: BaseException) -> str:
    """The message of a user error as one line, whatever wrapped it on the way up.

    A DataLoader worker re-raises its exception in the main process with the worker's whole traceback as the
    message ("Caught ShardError in DataLoader worker process 0. Original Traceback …"); the original message
    is its last line. Any other multi-line message is joined with "; " so that it still names what is at fault.
    """
    text = str(err).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        return type(err).__name__
    if lines[0].startswith("Caught ") and "Original Traceback" in text:
        last = lines[-1]
        head, sep, message = last.partition(": ")
        return message if sep and "Error" in head else last
    return "; ".join(lines)


class TrainError(MlanError, RuntimeError):
    """A training run that cannot start or continue; the message says which input is wrong."""
