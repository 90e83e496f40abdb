"""`mlan verify` (shards vs manifest: sha256, counts, and every row read as the loader reads it) and
`mlan inspect` (one packed row, for a person)."""
from __future__ import annotations

import io
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from mlan.data.images import ImageDecodeError, decode_image
from mlan.families.registry import find_family
from mlan.mixture.shards import (
    Manifest,
    ManifestError,
    PackedRow,
    ShardError,
    fs_of,
    read_manifest,
    read_shard,
    sha256_problem,
)

COUNT_KEYS = ("rows", "tokens", "loss_tokens", "tokens_by_modality", "tokens_by_source")


def shard_counts(rows: list[PackedRow] | object) -> dict:
    """Counts of a shard recomputed from its rows (the manifest's per-shard keys)."""
    out = {"rows": 0, "tokens": 0, "loss_tokens": 0, "tokens_by_modality": Counter(), "tokens_by_source": Counter()}
    for row in rows:
        out["rows"] += 1
        out["tokens"] += len(row)
        out["loss_tokens"] += int(row.loss.sum())
        for n, mod, src in zip(row.docs.tolist(), row.modalities, row.sources):
            out["tokens_by_modality"][mod] += n
            out["tokens_by_source"][src] += n
    return out


def row_problems(row: PackedRow, family_config: dict, decode: bool = True) -> list[str]:
    """What is wrong with one packed row against the build's `family_config` (the loader's contract).

    Document lengths sum to the row; each document holds exactly `image_tokens` image positions per image
    it owns; no loss on an image position; every image decodes in full (as the loader decodes it).
    """
    try:
        row.check()
    except ValueError as err:
        return [str(err).removeprefix(f"packed row {row.key!r}: ")]
    problems: list[str] = []
    image_id = family_config.get("image_token_id")
    plugin = find_family(family_config.get("family"))
    per_image = plugin.placeholders_per_image(int(family_config.get("image_tokens") or 1)) if plugin else 1
    if image_id is not None:
        is_image = row.ids == image_id
        bounds = np.concatenate([[0], np.cumsum(row.docs.astype(np.int64))])
        owned = Counter(int(d) for d in row.image_docs)
        for j in range(len(row.docs)):
            have = int(is_image[bounds[j]:bounds[j + 1]].sum())
            want = owned.get(j, 0) * per_image
            if have != want:
                problems.append(f"document {j} ({row.doc_ids[j]}) has {have} image tokens for {owned.get(j, 0)} "
                                f"images ({per_image} per image in family_config)")
        trained = int((row.loss[is_image] != 0).sum())
        if trained:
            problems.append(f"{trained} loss positions fall on image tokens")
    elif row.images:
        problems.append(f"{len(row.images)} images but family_config has no image_token_id")
    if decode:
        for i, (data, ext) in enumerate(zip(row.images, row.image_exts)):
            try:
                decode_image(data, f"img{i}.{ext}")
            except ImageDecodeError as err:
                problems.append(str(err))
    return problems


def verify_build(build_dir: str, rows: bool = True, read: bool = True, threads: int | None = None) -> list[str]:
    """Problems found, one line each naming the shard (and the row); empty when every shard matches.

    Every shard's sha256 is checked (in parallel threads: hashlib releases the GIL on large blocks). With
    `read`, every shard is also read and its counts recomputed; with `rows` as well, every row is checked as
    the loader would use it (`row_problems`). `read=False` is the seconds-long pre-flight of a training run.
    """
    manifest = read_manifest(build_dir)
    seq_len = manifest.seq_len
    family_config = manifest.family_config or {}
    problems: list[str] = []
    n_threads = threads or min(max(len(manifest.shards), 1), max(2, os.cpu_count() or 1), 16)
    with ThreadPoolExecutor(max_workers=n_threads) as pool:
        sha_problems = list(pool.map(sha256_problem, manifest.shards))
    for shard, entry, bad_sha in zip(manifest.shards, manifest.data["shards"], sha_problems):
        name, url = shard.name, shard.url
        fs, path = fs_of(url)
        if not fs.exists(path):
            problems.append(f"{name}: missing")
            continue
        if bad_sha:
            problems.append(bad_sha)
        if not read:
            continue
        try:
            shard_rows = list(read_shard(url))
        except Exception as err:  # noqa: BLE001 - any unreadable shard is reported, not raised
            problems.append(f"{name}: unreadable: {err}")
            continue
        for row in shard_rows:
            bad = row_problems(row, family_config, decode=rows) if rows else []
            if len(row) > seq_len:
                bad.append(f"{len(row)} tokens > seq_len {seq_len}")
            problems += [f"{name}: row {row.key}: {p}" for p in bad]
        got = shard_counts(shard_rows)
        for key in COUNT_KEYS:
            if key not in entry:
                problems.append(f"{name}: manifest has no {key}")
                continue
            want = entry[key]
            have = dict(got[key]) if isinstance(got[key], Counter) else got[key]
            if isinstance(want, dict):
                want = {k: v for k, v in want.items() if v}
            if have != want:
                problems.append(f"{name}: {key} {have} != manifest {want}")
    totals = manifest.totals
    for key in ("rows", "tokens") if read else ("rows",):
        s = sum(sh.get(key, 0) for sh in manifest.data["shards"])
        if totals[key] != s:
            problems.append(f"manifest: totals.{key} {totals[key]} != sum over shards {s}")
    return problems


def check_build(build_dir: str | Path, threads: int | None = None) -> int:
    """Pre-flight of a training run (by `mlan train` before torchrun starts; by a bare worker on rank 0 unless
    --no-verify): the manifest is sound and every shard's sha256 matches it, so a flipped byte, a truncated or
    missing shard stops the run in seconds with one line naming the shard. Returns the shard count."""
    build_dir = str(build_dir)
    manifest = read_manifest(build_dir)
    if not manifest.shards:
        raise ManifestError(f"{manifest.url}: lists no shards")
    problems = verify_build(build_dir, rows=False, read=False, threads=threads)
    if problems:
        more = f" ({len(problems)} problems; `mlan verify {build_dir}` lists them)" if len(problems) > 1 else ""
        error = ManifestError if problems[0].startswith("manifest:") else ShardError
        raise error(problems[0] + more)
    return len(manifest.shards)


# ---------------------------------------------------------------- inspect
def find_row(build_dir: str, index: int) -> tuple[dict, PackedRow]:
    """The manifest and the packed row at global index `index` (shards in manifest order)."""
    manifest: Manifest = read_manifest(build_dir)
    total = manifest.totals["rows"]
    if not 0 <= index < total:
        raise IndexError(f"{build_dir}: row {index} out of range (the build has {total} rows)")
    start = 0
    for shard in manifest.shards:
        if index < start + shard.rows:
            for i, row in enumerate(read_shard(shard.url)):
                if i == index - start:
                    return manifest.data, row
        start += shard.rows
    raise IndexError(f"{build_dir}: row {index} not found in the shards")


def _image_line(i: int, data: bytes, ext: str, doc: int) -> str:
    try:
        with Image.open(io.BytesIO(data)) as im:
            dims = f"{im.width}×{im.height} {im.mode}"
    except Exception:  # noqa: BLE001 - show what we can
        dims = "undecodable"
    return f"  image {i}: document {doc}, {ext}, {len(data):,} bytes, {dims}"


def describe_row(manifest: dict, row: PackedRow, tokenizer=None) -> str:
    """A row as text: documents separated, trained spans in [[…]], image slots collapsed, images listed."""
    from mlan.render import (  # lazy: +0.8 s (transformers); `mlan verify` never renders
        Document,
        format_document,
    )

    image_id = manifest.get("family_config", {}).get("image_token_id")
    seq_len = manifest["seq_len"]
    lines = [
        (f"row {row.key}: {len(row)} tokens of {seq_len} ({len(row) / seq_len:.1%}), {len(row.docs)} documents, "
         f"{int(row.loss.sum())} trained tokens, {len(row.images)} images")
    ]
    bounds = np.concatenate([[0], np.cumsum(row.docs.astype(np.int64))])
    for j in range(len(row.docs)):
        a, b = int(bounds[j]), int(bounds[j + 1])
        ids, loss = row.ids[a:b], row.loss[a:b]
        imgs = [i for i, d in enumerate(row.image_docs) if d == j]
        lines.append("")
        lines.append(
            f"── document {j}: {row.doc_ids[j]} · source {row.sources[j]} · {row.modalities[j]} · tokens {a}–{b} "
            f"({b - a}, {int(loss.sum())} trained)" + (f" · images {imgs}" if imgs else "")
        )
        if tokenizer is not None:
            doc = Document(row.doc_ids[j], row.sources[j], row.modalities[j], ids, loss)
            lines.append(format_document(doc, tokenizer, image_id))
        else:
            lines.append(" ".join(f"[[{t}]]" if m else str(t) for t, m in zip(ids.tolist(), loss.tolist())))
    if row.images:
        lines += ["", "images:"]
        lines += [_image_line(i, d, e, doc) for i, (d, e, doc) in enumerate(zip(row.images, row.image_exts, row.image_docs))]
    return "\n".join(lines)
