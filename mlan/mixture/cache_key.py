"""The tokenized cache's key: one function over everything that shapes a document, so any change to it
re-tokenizes and anything else (weights, ratio, budget, seed, shard size) reuses the cache.

What shapes a document: the source (its spec less the mixing knobs, its file bytes, its image folder's
listing: path, size, mtime and ctime of every file, whether the folder is `images:` or the source's own), the model spec and its resolved geometry, seq_len and the overlong policy, the image options
(decode policy, pixel and aspect limits, pre-resizing), the tokenizer's files, and the code that renders.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import fsspec

from mlan.recipe import Recipe, SourceSpec
from mlan.sources.images import image_root

CACHE_VERSION = "1"
# how images are checked and measured (full decode, EXIF orientation applied to sizes and tiles): in every key
IMAGE_DECODE = "full+exif-orientation"
MIXING_KNOBS = ("weight", "upsample")  # source fields that choose how often a document is used, never its tokens
# the code whose output lands in the cache, relative to the mlan package: a change to any of it rebuilds.
# Only the code that shapes tokenized documents: editing the trainer, the merge map or the Mllama patch
# (also under families/) must not re-tokenize every source. A path that is not there is an error.
CODE_PATHS = (
    "render.py", "piece_encoding.py", "templates.py", "tokenizer.py", "sources",
    "families/__init__.py", "families/base.py", "families/local_config.py", "families/registry.py",
    "families/tiny.py", "families/*/tiny.py",
    "families/*/__init__.py", "families/*/geometry.py",  # each family's torch-free side: registration, accounting
    "mixture/cache.py", "mixture/pre_resize.py",
)
_PACKAGE = Path(__file__).resolve().parents[1]


def code_fingerprint() -> str:
    """sha256 over the rendering code (CODE_PATHS); a missing path raises, so a moved module cannot drop out."""
    h = hashlib.sha256()
    for rel in CODE_PATHS:
        paths = sorted(_PACKAGE.glob(rel)) if "*" in rel else [_PACKAGE / rel]
        if not paths or not all(p.exists() for p in paths):
            raise FileNotFoundError(f"cache key: {rel} is in CODE_PATHS but does not exist (was it moved?)")
        for p in paths:
            for f in sorted(p.rglob("*.py")) if p.is_dir() else [p]:
                h.update(str(f.relative_to(_PACKAGE)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def tokenizer_fingerprint(name: str) -> str:
    """A key for the tokenizer from its files (no transformers import in the driver); a hub id: its name."""
    h = hashlib.sha256(name.encode())
    if name == "llama3":
        spec = importlib.util.find_spec("llama_models")
        files = [Path(spec.origin).parent / "llama3" / "tokenizer.model"] if spec and spec.origin else []
    else:
        p = Path(name)
        files = sorted(f for f in p.iterdir() if f.is_file() and f.stat().st_size < (64 << 20)) if p.is_dir() else (
            [p] if p.is_file() else [])
    for f in files:
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def _hash_path(path: str, h: hashlib._Hash, with_bytes: bool) -> bool:
    """Feed a file's bytes (or a folder's listing) into `h`; False when the path is not on any filesystem."""
    try:
        fs, p = fsspec.core.url_to_fs(path)
        if not fs.exists(p):
            return False
    except Exception:  # noqa: BLE001 - an unknown protocol: treat as a hub id
        return False
    if fs.isdir(p):
        for name, info in sorted(fs.find(p, detail=True).items()):
            rel = name[len(p.rstrip("/")) + 1 :]
            # ctime (`created` on a local disk): changed by every write, and no tool can set it back, so an
            # image rewritten with its old size and mtime (`touch -r`) still misses
            stamp = f"{info.get('mtime', info.get('LastModified', ''))}\0{info.get('created', '')}"
            h.update(f"{rel}\0{info.get('size')}\0{stamp}\n".encode())
            if with_bytes and info.get("size", 0) <= (64 << 20) and rel.endswith((".json", ".jsonl", ".parquet", ".arrow", ".csv", ".txt")):
                with fs.open(name, "rb") as f:
                    while block := f.read(1 << 22):
                        h.update(block)
    else:
        with fs.open(p, "rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
    return True


def _source_key(shared: dict, source: SourceSpec) -> str:
    spec = {k: v for k, v in source.model_dump(mode="json").items() if k not in MIXING_KNOBS}
    h = hashlib.sha256(json.dumps({**shared, "source": spec}, sort_keys=True).encode())
    h.update(b"content\0")
    if not _hash_path(source.path, h, with_bytes=True):
        h.update(f"hub:{source.path}:{source.subset}:{source.split}".encode())
    root = source.images or (image_root(source) if source.modality == "image_text" else None)
    if root:  # whatever the root: an explicit `images:` or the source file's own folder (#22)
        h.update(b"images\0")
        _hash_path(root, h, with_bytes=False)
    return h.hexdigest()[:24]


def source_cache_keys(recipe: Recipe, family_config: dict) -> list[str]:
    """The cache key of each source of `recipe`, in order: the only place a tokenized cache is named.

    `family_config` (the resolved image geometry) is part of the key: two model sections that dump alike
    can still resolve differently (an explicit `image_tokens: 576` vs the tiny default of 16).
    """
    mix = recipe.mixture
    shared = {
        "version": CACHE_VERSION,
        "model": recipe.model.model_dump(mode="json"),
        "seq_len": mix.seq_len,
        "overlong": mix.overlong,
        "max_record_bytes": mix.max_record_bytes,  # which records are refused before tokenizing
        "pre_resize": recipe.shards.pre_resize,
        "family_config": family_config,
        "images": {"decode": IMAGE_DECODE, "max_pixels": mix.max_image_pixels, "max_aspect": mix.max_image_aspect},
        "tokenizer": tokenizer_fingerprint(recipe.model.tokenizer),
        "code": code_fingerprint(),
    }
    return [_source_key(shared, source) for source in recipe.sources]


def combine_fingerprints(fps: list[str]) -> str:
    """The build's fingerprint (its manifest's `fingerprint`): its sources' keys together."""
    return hashlib.sha256("\n".join(fps).encode()).hexdigest()[:24]
