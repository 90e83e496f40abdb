"""`mlan verify` (shards vs manifest: sha256 and counts) and `mlan inspect` (one packed row, for a person)."""
from __future__ import annotations

import sys
from collections import Counter

import numpy as np

from mlan.mixture.shards import PackedRow, join_url, load_manifest, read_shard, sha256_of

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


def verify_build(build_dir: str) -> list[str]:
    """Problems found, one line each naming the shard; empty when every shard matches the manifest."""
    import fsspec

    manifest = load_manifest(build_dir)
    seq_len = int(manifest["seq_len"])
    problems: list[str] = []
    for shard in manifest["shards"]:
        name = shard["name"]
        url = join_url(build_dir, name)
        fs, path = fsspec.core.url_to_fs(url)
        if not fs.exists(path):
            problems.append(f"{name}: missing")
            continue
        digest = sha256_of(url)
        if digest != shard["sha256"]:
            problems.append(f"{name}: sha256 {digest} != manifest {shard['sha256']}")
        try:
            rows = []
            for row in read_shard(url):
                row.check()
                if len(row) > seq_len:
                    raise ValueError(f"row {row.key!r} has {len(row)} tokens > seq_len {seq_len}")
                rows.append(row)
        except Exception as err:  # noqa: BLE001 - any unreadable shard is reported, not raised
            problems.append(f"{name}: unreadable: {err}")
            continue
        got = shard_counts(rows)
        for key in COUNT_KEYS:
            want = shard[key]
            have = dict(got[key]) if isinstance(got[key], Counter) else got[key]
            if isinstance(want, dict):
                want = {k: v for k, v in want.items() if v}
            if have != want:
                problems.append(f"{name}: {key} {have} != manifest {want}")
    totals = manifest.get("totals", {})
    for key in ("rows", "tokens"):
        s = sum(sh[key] for sh in manifest["shards"])
        if key in totals and totals[key] != s:
            problems.append(f"manifest: totals.{key} {totals[key]} != sum over shards {s}")
    return problems


def verify_command(args) -> int:
    from rich.console import Console

    console = Console(stderr=True, highlight=False)
    problems = verify_build(args.build_dir)
    manifest = load_manifest(args.build_dir)
    if problems:
        for p in problems:
            console.print(f"[red]BAD[/red] {p}")
        bad = sorted({p.split(":", 1)[0] for p in problems})
        console.print(f"mlan verify: {len(bad)} of {len(manifest['shards'])} shards bad: {', '.join(bad)}")
        return 1
    console.print(f"mlan verify: {len(manifest['shards'])} shards, {manifest['totals']['rows']} rows, "
                  f"{manifest['totals']['tokens']:,} tokens: all match the manifest")
    return 0


# ---------------------------------------------------------------- inspect
def find_row(build_dir: str, index: int) -> tuple[dict, PackedRow]:
    """The manifest and the packed row at global index `index` (shards in manifest order)."""
    manifest = load_manifest(build_dir)
    total = manifest["totals"]["rows"]
    if not 0 <= index < total:
        raise IndexError(f"{build_dir}: row {index} out of range (the build has {total} rows)")
    start = 0
    for shard in manifest["shards"]:
        if index < start + shard["rows"]:
            for i, row in enumerate(read_shard(join_url(build_dir, shard["name"]))):
                if i == index - start:
                    return manifest, row
        start += shard["rows"]
    raise IndexError(f"{build_dir}: row {index} not found in the shards")


def _image_line(i: int, data: bytes, ext: str, doc: int) -> str:
    import io

    try:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:
            dims = f"{im.width}×{im.height} {im.mode}"
    except Exception:  # noqa: BLE001 - show what we can
        dims = "undecodable"
    return f"  image {i}: document {doc}, {ext}, {len(data):,} bytes, {dims}"


def describe_row(manifest: dict, row: PackedRow, tokenizer=None) -> str:
    """A row as text: documents separated, trained spans in [[…]], image slots collapsed, images listed."""
    from mlan.render import Document, format_document

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


def _load_tokenizer(manifest: dict):
    try:
        from mlan.tokenizer import load_tokenizer

        return load_tokenizer(manifest["recipe"]["model"]["tokenizer"])
    except Exception as err:  # noqa: BLE001 - ids are still worth showing
        print(f"mlan inspect: tokenizer unavailable ({err}); showing ids", file=sys.stderr)
        return None


def inspect_command(args) -> int:
    try:
        manifest, row = find_row(args.build_dir, args.row)
    except IndexError as err:
        print(f"mlan inspect: error: {err}", file=sys.stderr)
        return 2
    print(describe_row(manifest, row, _load_tokenizer(manifest)))
    return 0
