"""The packed-row format: one WebDataset sample = one packed row (design.md, "Packed row").

`<key>.ids.npy` uint32 token ids, `<key>.loss.npy` uint8 loss mask, `<key>.docs.npy` uint32 document
lengths summing to the row length, `<key>.img{i}.<ext>` encoded images in order of appearance, and
`<key>.json` with per-document lists (doc_ids, sources, modalities) and image_docs (each image's doc).
Padding is never stored; the collator pads.
"""
from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import fsspec
import numpy as np

from mlan.atomic_write import write_text_atomic
from mlan.errors import MlanError
from mlan.families.base import GeometryError, ModelGeometry


@dataclass
class PackedRow:
    ids: np.ndarray  # uint32 (L,)
    loss: np.ndarray  # uint8 (L,)
    docs: np.ndarray  # uint32 (n_docs,), sums to L
    doc_ids: list[str]
    sources: list[str]
    modalities: list[str]
    images: list[bytes] = field(default_factory=list)  # encoded, in order of appearance
    image_exts: list[str] = field(default_factory=list)
    image_docs: list[int] = field(default_factory=list)  # for each image, the index of its document
    key: str = ""

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def check(self) -> None:
        """The row's invariants; raises ValueError naming the row on violation."""
        n = len(self)
        problems = []
        if self.loss.shape != (n,):
            problems.append(f"loss mask length {self.loss.shape} != {n}")
        if int(self.docs.sum()) != n:
            problems.append(f"document lengths sum to {int(self.docs.sum())}, row has {n} tokens")
        if not (len(self.doc_ids) == len(self.sources) == len(self.modalities) == len(self.docs)):
            problems.append("per-document lists differ in length")
        if not (len(self.images) == len(self.image_exts) == len(self.image_docs)):
            problems.append("image lists differ in length")
        if problems:
            raise ValueError(f"packed row {self.key!r}: " + "; ".join(problems))


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _from_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def row_to_sample(row: PackedRow) -> dict[str, bytes | str]:
    """A WebDataset sample dict (`__key__` plus extension → bytes), deterministic byte for byte."""
    sample: dict[str, bytes | str] = {
        "__key__": row.key,
        "ids.npy": _npy(np.ascontiguousarray(row.ids, dtype=np.uint32)),
        "loss.npy": _npy(np.ascontiguousarray(row.loss, dtype=np.uint8)),
        "docs.npy": _npy(np.ascontiguousarray(row.docs, dtype=np.uint32)),
        "json": json.dumps(
            {
                "doc_ids": row.doc_ids,
                "sources": row.sources,
                "modalities": row.modalities,
                "image_docs": [int(d) for d in row.image_docs],
            },
            sort_keys=True,
        ).encode(),
    }
    for i, (data, ext) in enumerate(zip(row.images, row.image_exts)):
        sample[f"img{i}.{ext}"] = data
    return sample


def sample_to_row(sample: dict) -> PackedRow:
    """Inverse of `row_to_sample`; accepts the raw dict webdataset yields (bytes values)."""
    meta = json.loads(sample["json"])
    images, exts = [], []
    img_keys = sorted(
        (k for k in sample if k.startswith("img") and "." in k),
        key=lambda k: int(k.split(".", 1)[0][3:]),
    )
    for k in img_keys:
        images.append(sample[k])
        exts.append(k.split(".", 1)[1])
    return PackedRow(
        ids=_from_npy(sample["ids.npy"]),
        loss=_from_npy(sample["loss.npy"]),
        docs=_from_npy(sample["docs.npy"]),
        doc_ids=meta["doc_ids"],
        sources=meta["sources"],
        modalities=meta["modalities"],
        images=images,
        image_exts=exts,
        image_docs=meta["image_docs"],
        key=sample.get("__key__", ""),
    )


# ---------------------------------------------------------------- shard files (tar) and the manifest

MANIFEST = "manifest.json"


class ManifestError(MlanError, ValueError):
    """A manifest.json that is not valid JSON or not a build manifest; one line naming the file."""


class ShardError(MlanError, ValueError):
    """A shard that is missing, corrupted or disagrees with the manifest; the message names the shard."""


SHARD_DIR = "shards"


def shard_name(index: int) -> str:
    """A shard's path relative to the build directory."""
    return f"{SHARD_DIR}/shard-{index:06d}.tar"


def row_key(shard: int, row: int) -> str:
    """Row keys are unique across a build: shard index and row index within the shard."""
    return f"{shard:06d}-{row:06d}"


def write_tar(fileobj: IO[bytes], samples: list[dict[str, bytes | str]]) -> None:
    """A plain tar, deterministic byte for byte (mtime 0, no owner), readable by webdataset and tarfile.

    Kept instead of webdataset's TarWriter: with mtime=0, user/group "" and USTAR it is equal up to member
    order, but TarWriter writes a sample's files sorted by extension (img0.png before json before loss.npy),
    so its shards would not be byte-identical to the ones already built and recorded in manifests."""
    with tarfile.open(fileobj=fileobj, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            key = sample["__key__"]
            for ext, data in sample.items():
                if ext == "__key__":
                    continue
                payload = data.encode() if isinstance(data, str) else data
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                info.mtime = 0
                info.mode = 0o444
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(payload))


def split_key(member: str) -> tuple[str | None, str | None]:
    """The one key split: webdataset's own (key = the name up to the first dot of its last component, with
    any folder; extension = the rest); (None, None) for a name without an extension."""
    # lazy: webdataset's package imports torch (1.2 s), which a build's driver and its Ray actors never need
    from webdataset.tariterators import base_plus_ext

    return base_plus_ext(member)


def iter_tar_samples(fileobj: IO[bytes]) -> Iterator[dict[str, Any]]:
    """Samples of a tar as webdataset groups them: consecutive files sharing a key (`split_key`); files
    without an extension are skipped, as webdataset skips them."""
    current: dict[str, Any] | None = None
    with tarfile.open(fileobj=fileobj, mode="r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, ext = split_key(member.name)
            if key is None:
                continue
            data = tar.extractfile(member).read()
            if current is None or current["__key__"] != key:
                if current is not None:
                    yield current
                current = {"__key__": key}
            current[ext] = data
    if current is not None:
        yield current


def read_shard(url: str) -> Iterator[PackedRow]:
    """The packed rows of one shard file (local path or fsspec URL)."""
    with fsspec.open(url, "rb") as f:
        for sample in iter_tar_samples(f):
            yield sample_to_row(sample)


def fs_of(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and bare path of a local path or fsspec URL (the one place the build resolves URLs)."""
    return fsspec.core.url_to_fs(url)


def sha256_of(url: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with fsspec.open(url, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def join_url(base: str, *parts: str) -> str:
    """Join a local path or fsspec URL with relative parts (always '/')."""
    return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])


@dataclass(frozen=True)
class Shard:
    """One manifest entry, with its location resolved against the build directory."""

    name: str  # relative to the build directory, as in the manifest
    url: str  # local path or fsspec URL
    rows: int
    sha256: str | None


@dataclass(frozen=True)
class Manifest:
    """A finished build's manifest.json: the typed fields every reader relies on, and the whole JSON object
    (`data`) for the keys only one reader uses (totals, recipe, stats...)."""

    build_dir: str
    url: str
    seq_len: int
    family_config: dict[str, Any]
    shards: list[Shard]
    data: dict[str, Any]

    @property
    def totals(self) -> dict[str, Any]:
        return self.data.get("totals", {})

    @property
    def geometry(self) -> ModelGeometry:
        """`family_config`, typed (already checked by `read_manifest`)."""
        return ModelGeometry.from_manifest(self.family_config)


def _manifest_error(url: str, what: str) -> ManifestError:
    return ManifestError(f"{url}: {what}")


# A shard name is a relative path of plain parts (`shards/shard-000000.tar`), resolved inside the build folder:
# never absolute, never `..`, no URL scheme, no backslash or control character.
_PLAIN_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
_COUNT_TABLES = ("tokens_by_modality", "tokens_by_source")


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_count_table(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and _is_count(v) for k, v in value.items())


def is_plain_shard_name(name: Any) -> bool:
    """A relative path of plain parts: what `mlan build` writes, and all a manifest may name."""
    return isinstance(name, str) and 0 < len(name) <= 4096 and all(
        _PLAIN_PART.fullmatch(part) for part in name.split("/"))


def _check_manifest(url: str, data: Any) -> None:
    """The manifest's schema, checked once: every key a reader relies on, with its type (one line naming it)."""
    if not isinstance(data, dict) or not isinstance(data.get("shards"), list):
        raise _manifest_error(url, "not a build manifest (no `shards` list)")
    for key in ("seq_len", "family_config"):
        if key not in data:
            raise _manifest_error(url, f"missing key {key!r}")
    if not _is_count(data["seq_len"]) or data["seq_len"] == 0:
        raise _manifest_error(url, f"seq_len {data['seq_len']!r} is not a positive integer")
    if not isinstance(data["family_config"], dict):
        raise _manifest_error(url, f"family_config is a {type(data['family_config']).__name__}, not an object")
    seen: set[str] = set()
    for i, entry in enumerate(data["shards"]):
        where = f"shards[{i}]"
        if not isinstance(entry, dict):
            raise _manifest_error(url, f"{where} is a {type(entry).__name__}, not an object")
        for key in ("name", "rows"):
            if key not in entry:
                raise _manifest_error(url, f"{where} has no {key!r}")
        name = entry["name"]
        if not is_plain_shard_name(name):
            raise _manifest_error(url, f"{where}.name {str(name)[:200]!r} is not a plain relative name inside the "
                                       "build folder (letters, digits, ._- and /; no '..', no absolute path)")
        if name in seen:
            raise _manifest_error(url, f"{where}.name {name!r} is listed twice")
        seen.add(name)
        for key in ("rows", "tokens", "loss_tokens"):
            if key in entry and not _is_count(entry[key]):
                raise _manifest_error(url, f"{where}.{key} {entry[key]!r} is not a count (a non-negative integer)")
        for key in _COUNT_TABLES:
            if key in entry and not _is_count_table(entry[key]):
                raise _manifest_error(url, f"{where}.{key} is not an object of counts")
        sha = entry.get("sha256")
        if sha is not None and not (isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha)):
            raise _manifest_error(url, f"{where}.sha256 {str(sha)[:80]!r} is not a sha256 hex digest")
    if "totals" not in data:
        raise _manifest_error(url, "missing key 'totals'")
    totals = data["totals"]
    if not isinstance(totals, dict):
        raise _manifest_error(url, f"totals is a {type(totals).__name__}, not an object")
    for key in ("rows", "tokens"):
        if not _is_count(totals.get(key)):
            raise _manifest_error(url, f"totals.{key} {totals.get(key)!r} is not a count (a non-negative integer)")
    try:
        ModelGeometry.from_manifest(data["family_config"])
    except GeometryError as err:
        raise _manifest_error(url, str(err)) from None


def read_manifest(build_dir: str) -> Manifest:
    """The one reader of manifest.json, and the one place it is validated: a directory that is not a finished
    build, JSON that is not a manifest (wrong types, deep nesting) or a shard name outside the build folder is
    one line naming the file and the key."""
    url = join_url(build_dir, MANIFEST)
    fs, path = fs_of(url)
    if not fs.exists(path):
        raise FileNotFoundError(f"{url}: no manifest (is {build_dir} a finished `mlan build` output directory?)")
    try:
        with fs.open(path, "r", encoding="utf-8") as f:
            text = f.read()
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise _manifest_error(url, f"not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from None
    except UnicodeDecodeError as err:
        raise _manifest_error(url, f"not UTF-8 text ({err.reason} at byte {err.start})") from None
    except RecursionError:
        raise _manifest_error(url, "not a build manifest (JSON nested too deeply)") from None
    _check_manifest(url, data)
    shards = [Shard(s["name"], join_url(build_dir, s["name"]), s["rows"], s.get("sha256")) for s in data["shards"]]
    return Manifest(build_dir, url, data["seq_len"], data["family_config"], shards, data)


def write_manifest(build_dir: str, data: dict[str, Any]) -> None:
    """The one writer of manifest.json: indented JSON, written under a temporary name then renamed, so a
    reader never sees half a manifest (its presence marks a finished build)."""
    write_text_atomic(join_url(build_dir, MANIFEST), json.dumps(data, indent=2) + "\n")


def sha256_problem(shard: Shard) -> str | None:
    """The one sha256 check: None when the shard's bytes match the manifest, else one line naming it."""
    try:
        digest = sha256_of(shard.url)
    except FileNotFoundError:
        return f"{shard.name}: shard file missing ({shard.url})"
    if shard.sha256 is None:
        return f"{shard.name}: manifest has no sha256 to verify against"
    if digest != shard.sha256:
        return (f"{shard.name}: sha256 {digest} does not match the manifest's {shard.sha256} "
                "(corrupted or rewritten shard)")
    return None
