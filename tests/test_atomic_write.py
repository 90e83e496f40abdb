"""The one atomic write: the target holds the old bytes or the new ones, never a mix, and no temp is left."""
from __future__ import annotations

from pathlib import Path

import pytest

from mlan.atomic_write import atomic_open, write_text_atomic


def test_replaces_whole_file_local_and_url(tmp_path: Path) -> None:
    target = tmp_path / "a.json"
    target.write_text("old")
    write_text_atomic(target, "new ü\n", encoding="utf-8")
    assert target.read_text(encoding="utf-8") == "new ü\n"
    write_text_atomic(f"file://{target}", "again")
    assert target.read_text() == "again"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "part.bin"
    target.write_bytes(b"complete")
    with pytest.raises(RuntimeError), atomic_open(target, "wb", suffix=".partial") as f:
        f.write(b"half")
        assert (tmp_path / "part.bin.partial").read_bytes() in (b"", b"half")  # written beside, not over
        raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"complete"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["part.bin"]


def test_text_options_reach_the_file(tmp_path: Path) -> None:
    with atomic_open(tmp_path / "m.csv", "w", newline="") as f:
        f.write("a,b\r\n")
    assert (tmp_path / "m.csv").read_bytes() == b"a,b\r\n"
