"""The one atomic write: a file is written under a temporary name and renamed into place, so a reader (or a
resumed run) never sees half of it. Local paths and fsspec URLs alike."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import fsspec

TMP_SUFFIX = ".tmp"


@contextlib.contextmanager
def atomic_open(url: str | Path, mode: str = "w", suffix: str = TMP_SUFFIX, **kwargs: Any) -> Iterator[IO[Any]]:
    """A file opened for writing at `url` + `suffix`; renamed to `url` when the block ends cleanly, removed
    when it raises. `kwargs` go to the text layer (encoding, newline)."""
    fs, path = fsspec.core.url_to_fs(str(url))
    tmp = path + suffix
    try:
        with fs.open(tmp, mode, **kwargs) as f:
            yield f
    except BaseException:
        with contextlib.suppress(OSError):
            fs.rm(tmp)
        raise
    fs.mv(tmp, path)


def write_text_atomic(url: str | Path, text: str, encoding: str | None = None) -> None:
    """Write `text` to `url` atomically (see atomic_open)."""
    with atomic_open(url, "w", encoding=encoding) as f:
        f.write(text)
