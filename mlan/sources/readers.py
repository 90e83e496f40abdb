"""Raw records from wherever a source lives, with their index in the source, in a stable order.

Local or fsspec `.json` (a JSON array, or JSON lines whatever the extension), `.jsonl`, `.parquet`
(optionally compressed), folders of them (sorted), saved `datasets` folders and Hugging Face dataset ids
(streamed). A malformed line is a `RecordError` in the stream; the read goes on.
"""
from __future__ import annotations

import json
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow.parquet as pq

from mlan.errors import MlanError
from mlan.recipe import SourceSpec
from mlan.sources.formats import to_conversation
from mlan.sources.records import Conversation, RecordError

JSON_SUFFIXES = (".json", ".jsonl", ".ndjson")
DATA_SUFFIXES = JSON_SUFFIXES + (".parquet",)
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst", ".zstd")
HF_PREFIX = "hf:"  # `hf:org/name` or `hf:/a/local/folder`: always through datasets.load_dataset
_BATCH = 1024


class SourceError(MlanError, ValueError):
    """A source that cannot be read at all (path not found, no data files): a recipe problem, not a record's."""


@dataclass(frozen=True)
class RawLine:
    """A JSON line read but not parsed: a build ships these to its workers, which parse them in parallel
    (the driver, alone, would be the bottleneck). `parse` gives the record or the same RecordError as an
    eager read."""

    data: bytes
    lineno: int

    def parse(self, file: str, index: int) -> Any:
        try:
            return json.loads(self.data)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise RecordError(file, index, f"malformed JSON on line {self.lineno}: {err}") from None


def _data_suffix(path: str) -> str:
    """`.jsonl.gz` → `.jsonl`: the data format under an optional compression."""
    name = posixpath.basename(path).lower()
    for comp in COMPRESSIONS:
        if name.endswith(comp):
            name = name[: -len(comp)]
            break
    return posixpath.splitext(name)[1]


def _is_saved_dataset(fs: Any, path: str) -> bool:
    return fs.isfile(posixpath.join(path, "dataset_dict.json")) or (
        fs.isfile(posixpath.join(path, "state.json")) and fs.isfile(posixpath.join(path, "dataset_info.json")))


def _url(fs: Any, path: str, like: str) -> str:
    """An fs path back to something fsspec/datasets open: plain for local, scheme:// for remote."""
    if "://" not in like or like.startswith("file://"):
        return path
    return f"{like.split('://', 1)[0]}://{path}"


def source_kind(path: str) -> str:
    """`files` (a file or folder of data files), `saved` (datasets.save_to_disk folder) or `hub` (load_dataset)."""
    if path.startswith(HF_PREFIX) and not path.startswith("hf://"):
        return "hub"
    fs, fs_path = fsspec.core.url_to_fs(path)
    if fs.isdir(fs_path):
        return "saved" if _is_saved_dataset(fs, fs_path) else "files"
    if fs.isfile(fs_path):
        return "files"
    if "://" in path or path.startswith(("/", "./", "../", "~")) or _data_suffix(path) in DATA_SUFFIXES:
        raise SourceError(f"{path}: source path not found")
    return "hub"


def data_files(path: str) -> list[str]:
    """The data files of a file or folder source, sorted by path (the read order)."""
    fs, fs_path = fsspec.core.url_to_fs(path)
    if fs.isfile(fs_path):
        return [_url(fs, fs_path, path)]
    found = sorted(
        p for p in fs.find(fs_path)
        if _data_suffix(p) in DATA_SUFFIXES and not any(s.startswith((".", "_")) for s in p[len(fs_path):].split("/") if s)
    )
    if not found:
        raise SourceError(f"{path}: no {', '.join(DATA_SUFFIXES)} files in this folder")
    return [_url(fs, p, path) for p in found]


# ---------------------------------------------------------------- per-format file readers
def _open(file: str):
    return fsspec.open(file, "rb", compression="infer")


def _json_lines(file: str, lines: Iterator[bytes], raw: bool = False) -> Iterator[tuple[int, Any]]:
    """JSON lines: one record per non-blank line; a malformed line is a RecordError and the read goes on.

    With `raw`, lines are yielded as `RawLine`s for the consumer to parse.
    """
    k = 0
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if raw:
            yield k, RawLine(line, lineno)
            k += 1
            continue
        try:
            yield k, json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            yield k, RecordError(file, k, f"malformed JSON on line {lineno}: {err}")
        k += 1


def _read_json(file: str, raw: bool = False) -> Iterator[tuple[int, Any]]:
    """A JSON array, a single JSON object, or JSON lines (sniffed: NLVR's dev.json is JSON lines)."""
    with _open(file) as f:
        head = f.read(4096).removeprefix(b"\xef\xbb\xbf").lstrip()  # a UTF-8 BOM is not content
        f.seek(0)
        if head.startswith(b"["):
            try:
                data = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                yield 0, RecordError(file, None, f"malformed JSON array: {err}")
                return
            yield from enumerate(data if isinstance(data, list) else [data])
            return
        first = f.readline()
        f.seek(0)
        try:
            json.loads(first)
            one_per_line = True
        except (json.JSONDecodeError, UnicodeDecodeError):
            one_per_line = False
        if not one_per_line:  # perhaps one pretty-printed object
            try:
                data = json.load(f)
                yield from enumerate(data if isinstance(data, list) else [data])
                return
            except (json.JSONDecodeError, UnicodeDecodeError):
                f.seek(0)
        yield from _json_lines(file, f, raw)


def _read_parquet(file: str) -> Iterator[tuple[int, Any]]:
    with _open(file) as f:
        k = 0
        for batch in pq.ParquetFile(f).iter_batches(batch_size=_BATCH):
            for row in batch.to_pylist():
                yield k, row
                k += 1


def _read_file(file: str, raw: bool = False) -> Iterator[tuple[int, Any]]:
    suffix = _data_suffix(file)
    if suffix == ".parquet":
        return _read_parquet(file)
    if suffix == ".jsonl" or suffix == ".ndjson":
        return _json_lines_file(file, raw)
    return _read_json(file, raw)


def _json_lines_file(file: str, raw: bool = False) -> Iterator[tuple[int, Any]]:
    with _open(file) as f:
        yield from _json_lines(file, f, raw)


# ---------------------------------------------------------------- datasets
def _read_saved(path: str, split: str) -> Iterator[dict]:
    # lazy (here and in _read_hub): datasets costs ~0.6 s on top of the build driver's imports, and only
    # `saved` and `hub` sources need it
    import datasets

    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise SourceError(f"{path}: no split {split!r}; splits: {', '.join(ds)}")
        ds = ds[split]
    # arrow rows keep Image features as {bytes, path} (the original encoding) instead of decoded PIL images
    for batch in ds.with_format("arrow").iter(batch_size=_BATCH):
        yield from batch.to_pylist()


def _read_hub(path: str, subset: str | None, split: str) -> Iterator[dict]:
    import datasets

    ds = datasets.load_dataset(path, name=subset, split=split, streaming=True)
    yield from ds.decode(False)  # Image features as {bytes, path}: the stored encoding, not re-encoded


# ---------------------------------------------------------------- public API
def iter_source(spec: SourceSpec, raw_lines: bool = False) -> Iterator[tuple[str, int, dict | RecordError | RawLine]]:
    """(file, index, record or RecordError) over the whole source; indices are consecutive across files.

    With `raw_lines`, a JSON-lines record comes as a `RawLine` (unparsed; `.parse(file, index)` it).
    """
    path = spec.path
    kind = source_kind(path)
    if kind == "files":
        streams = ((file, _read_file(file, raw_lines)) for file in data_files(path))
    elif kind == "saved":
        streams = iter([(path, enumerate(_read_saved(path, spec.split)))])
    else:
        hub = path.removeprefix(HF_PREFIX)
        streams = iter([(path, enumerate(_read_hub(hub, spec.subset, spec.split)))])
    index = 0
    for file, records in streams:
        for _, record in records:
            if spec.limit is not None and index >= spec.limit:
                return
            if isinstance(record, RecordError) and record.index is None:
                yield file, index, record  # a whole file is unreadable: its records have no index
                continue
            if isinstance(record, RecordError):  # renumbered: the index within the source, not the file
                record = RecordError(record.file, index, record.reason, record.field)
            yield file, index, record
            index += 1


def check_source_paths(specs: list[SourceSpec]) -> None:
    """Every source path exists and (a file or folder source) holds data files; its image root exists.

    Called by `mlan build` and `mlan render` before any work (and before Ray starts), so a typo in one source
    is one SourceError naming the source and path, not a failure after the other sources were read.
    """
    for spec in specs:
        try:
            if source_kind(spec.path) == "files":
                data_files(spec.path)
        except SourceError as err:
            raise SourceError(f"source {spec.name!r}: {err}") from None
        if spec.images is not None:
            fs, root = fsspec.core.url_to_fs(spec.images)
            if not fs.isdir(root):
                raise SourceError(f"source {spec.name!r}: {spec.images}: image root folder not found")


def read_records(spec: SourceSpec) -> Iterator[tuple[int, dict | RecordError]]:
    """Raw records with their index in the source, in a stable order; a malformed one is a RecordError."""
    for _, index, record in iter_source(spec):
        yield index, record


def iter_conversations(spec: SourceSpec) -> Iterator[Conversation | RecordError]:
    """Every record of a source as a Conversation, or the RecordError that says why it is not one."""
    for file, index, record in iter_source(spec):
        if isinstance(record, RecordError):
            yield record
            continue
        try:
            yield to_conversation(spec, index, record, file)
        except RecordError as err:
            yield err
