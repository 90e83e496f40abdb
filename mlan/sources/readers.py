"""Raw records from wherever a source lives, with their index in the source, in a stable order.

Local or fsspec `.json` (a JSON array, or JSON lines whatever the extension), `.jsonl`, `.parquet`
(optionally compressed), folders of them (sorted), saved `datasets` folders and Hugging Face dataset ids
(streamed). A malformed line is a `RecordError` in the stream; the read goes on. A file that cannot be read
(a truncated Parquet file, a damaged or fake `.gz`) is a file-level `RecordError` after the records read
before the damage: one bad file never stops a build (docs/sources.md, "Bad input").
"""
from __future__ import annotations

import json
import posixpath
import re
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
# A record nested deeper than this is refused (no instruction format nests past ~6 levels); Python's JSON
# parser itself stops near 1,000 levels with a RecursionError, which is refused with the same reason.
MAX_JSON_DEPTH = 64
# A JSON line longer than this is refused unparsed (parsing it would hold gigabytes); images inlined as
# data: URLs fit. Each conversation's text is then held to `mixture.max_record_bytes` (tokenize stage).
MAX_JSON_LINE_BYTES = 256 << 20
# `\ud800`-`\udfff` escapes: only legal in pairs; a lone one decodes to a str that cannot be encoded as UTF-8
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


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
        return parse_json_line(self.data, file, index, self.lineno)


def parse_json_line(data: bytes, file: str, index: int, lineno: int) -> Any:
    """One JSON line → its value, checked (`check_json_value`); any failure is the record's RecordError."""
    if len(data) > MAX_JSON_LINE_BYTES:
        raise RecordError(file, index, f"line {lineno} is {len(data):,} bytes, more than the {MAX_JSON_LINE_BYTES:,} "
                          "a JSON line may hold; not parsed")
    try:
        value = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RecordError(file, index, f"malformed JSON on line {lineno}: {err}") from None
    except RecursionError:
        raise RecordError(file, index, f"JSON on line {lineno} is nested deeper than {MAX_JSON_DEPTH} levels") from None
    check_json_value(value, file, index, data)
    return value


def check_json_value(value: Any, file: str, index: int | None, data: bytes | None = None) -> None:
    """Refuse a parsed JSON value nested deeper than MAX_JSON_DEPTH or holding a lone UTF-16 surrogate.

    `data` (the raw text) lets the walk be skipped when it cannot find anything: fewer brackets than the
    depth limit and no surrogate escape (the common case costs two byte scans at C speed).
    """
    if data is not None and data.count(b"[") + data.count(b"{") <= MAX_JSON_DEPTH \
            and not _SURROGATE_ESCAPE.search(data):
        return
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if not item.isascii():
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError as err:
                    bad = item[err.start]
                    raise RecordError(file, index, f"lone UTF-16 surrogate \\u{ord(bad):04x} in a string "
                                      "(not valid Unicode text)") from None
            continue
        if not isinstance(item, (dict, list)):
            continue
        if depth > MAX_JSON_DEPTH:
            raise RecordError(file, index, f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(item, dict):
            stack.extend((k, depth) for k in item)  # keys are strings too
            stack.extend((c, depth + 1) for c in item.values())
        else:
            stack.extend((c, depth + 1) for c in item)


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
        else:
            try:
                yield k, parse_json_line(line, file, k, lineno)
            except RecordError as err:
                yield k, err
        k += 1


def _checked(file: str, values: list, text: bytes) -> Iterator[tuple[int, Any]]:
    """The elements of a parsed JSON array (or one object), each checked as a record when the file's
    text holds a surrogate escape; otherwise as they are (it parsed, so it is under Python's depth limit,
    and walking a 665K-record array would cost the driver seconds)."""
    if not _SURROGATE_ESCAPE.search(text):
        yield from enumerate(values)
        return
    for k, value in enumerate(values):
        try:
            check_json_value(value, file, k)
        except RecordError as err:
            yield k, err
            continue
        yield k, value


def _read_json(file: str, raw: bool = False) -> Iterator[tuple[int, Any]]:
    """A JSON array, a single JSON object, or JSON lines (sniffed: NLVR's dev.json is JSON lines)."""
    with _open(file) as f:
        head = f.read(4096).removeprefix(b"\xef\xbb\xbf").lstrip()  # a UTF-8 BOM is not content
        f.seek(0)
        if head.startswith(b"["):
            text = f.read()
            try:
                data = json.loads(text)
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                yield 0, RecordError(file, None, f"malformed JSON array: {err}")
                return
            except RecursionError:
                yield 0, RecordError(file, None, "JSON array nested too deeply to parse")
                return
            yield from _checked(file, data if isinstance(data, list) else [data], text)
            return
        first = f.readline()
        f.seek(0)
        try:
            json.loads(first)
            one_per_line = True
        except (json.JSONDecodeError, UnicodeDecodeError):
            one_per_line = False
        except RecursionError:  # a line too deep: JSON lines, and that line is refused when parsed
            one_per_line = True
        if not one_per_line:  # perhaps one pretty-printed object
            text = f.read()
            try:
                data = json.loads(text)
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
                f.seek(0)
            else:
                yield from _checked(file, data if isinstance(data, list) else [data], text)
                return
        yield from _json_lines(file, f, raw)


def _read_parquet(file: str) -> Iterator[tuple[int, Any]]:
    """Rows, one row group at a time: a damaged row group ends the read after the groups before it (a
    whole-file iterator reads ahead and would lose those too)."""
    with _open(file) as f:
        k = 0
        parquet = pq.ParquetFile(f)
        for group in range(parquet.num_row_groups):
            for batch in parquet.iter_batches(batch_size=_BATCH, row_groups=[group]):
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
def _until_damage(file: str, records: Iterator[tuple[int, Any]]) -> Iterator[tuple[int, Any]]:
    """A file's records up to the first read failure, then that failure as a file-level RecordError.

    A truncated Parquet file, a damaged or fake `.gz`, a file that vanished: the records read before the
    damage are kept, the rest of the file is listed with its reason, and the next file is read.
    """
    n = 0
    try:
        for item in records:
            yield item
            n += 1
    except SourceError:
        raise  # the source itself (a missing split), not one of its files
    except Exception as err:  # noqa: BLE001 - every reader's and decompressor's own error types
        where = f"after {n} records" if n else "before any record"
        yield n, RecordError(file, None, f"unreadable file ({where}): {_file_reason(err)}")


def _file_reason(err: BaseException) -> str:
    """`TypeName: message` on one line; PyArrow and the decompressors say what was wrong, not where."""
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


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
        for _, record in _until_damage(file, records):
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
