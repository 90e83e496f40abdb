"""The error contract: every error a user can cause derives from `MlanError`.

A leaf module (imports nothing from mlan) so that any layer can raise these without importing the command
layer. The command layer prints `mlan CMD: error: <message>` on one line and exits with status 2.
"""
from __future__ import annotations


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
