"""Warnings that save runs: recipe choices that are probably mistakes, one line each, said before the shards are
written (the build still runs: each may be intended).

- most of a source's documents are longer than `mixture.seq_len` (truncated or dropped);
- the budget needs a source's documents repeated many times over;
- an image-text source whose image paths are relative, that sets no `images:` root, and whose first such path is
  not found under the folder they then resolve against (the source file's folder).
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import PurePosixPath
from typing import Any

from mlan import progress
from mlan.mixture.plan import Plan
from mlan.recipe import Recipe, SourceSpec
from mlan.sources.images import image_root
from mlan.sources.readers import iter_source

LONG_SHARE = 0.5  # more than this share of a source's documents over seq_len
MANY_REPEATS = 4.0  # a source used this many times over (or more)
PEEK_RECORDS = 20  # records read to find relative image paths
IMAGE_KEYS = ("image", "images", "image_path", "image_file", "path")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff")


def recipe_warnings(recipe: Recipe) -> list[str]:
    """What can be told from the recipe and a peek at its sources, before any tokenizing."""
    out = []
    for spec in recipe.sources:
        example = _relative_image_path(spec)
        root = image_root(spec) if example is not None else None
        if example is not None and root is not None and "://" not in root and \
                not os.path.exists(os.path.join(root, _rewritten(example, spec.image_path))):
            out.append(f"source {spec.name!r}: image paths are relative (e.g. {example!r}) and the source sets no "
                       f"`images:` root; under {root!r}, where they resolve, {example!r} is not found: set "
                       f"sources.{spec.name}.images to the image folder")
    return out


def plan_warnings(recipe: Recipe, plan: Plan, summaries: dict[str, dict]) -> list[str]:
    """What the tokenized sources and the plan show: overlong documents, sources repeated many times."""
    out = []
    seq_len = recipe.mixture.seq_len
    for name, s in summaries.items():
        usable = s["accepted"] + s["dropped"]
        long = s["truncated"] + s["dropped"]
        if usable and long / usable > LONG_SHARE:
            out.append(f"source {name!r}: {long / usable:.0%} of its documents are longer than mixture.seq_len = "
                       f"{seq_len} ({s['truncated']} truncated, {s['dropped']} dropped); raise mixture.seq_len "
                       "or choose shorter data")
    for sp in plan.sources:
        if sp.available_docs and sp.docs / sp.available_docs >= MANY_REPEATS:
            out.append(f"source {sp.name!r}: the budget uses its {sp.available_docs} {sp.modality} documents "
                       f"{sp.docs / sp.available_docs:.1f} times over; add data, lower mixture.budget or "
                       f"lower the source's weight")
    return out


def say(lines: list[str]) -> None:
    """Each warning as one line (`warning: …`), before the work goes on."""
    for line in lines:
        progress.warn(line)


def _relative_image_path(spec: SourceSpec) -> str | None:
    """A relative image path of an image-text source without `images:` (template or the first records)."""
    if spec.modality != "image_text" or spec.images is not None:
        return None
    template_image = getattr(spec.template, "image", None) if spec.template is not None else None
    if template_image:  # a pattern over record fields: the folder part is what can be checked
        folder = template_image.split("{", 1)[0].rsplit("/", 1)[0]
        return folder if folder and _is_relative(template_image) else None
    try:
        for n, (_file, _index, record) in enumerate(iter_source(spec)):
            if n >= PEEK_RECORDS:
                break
            if isinstance(record, dict):
                found = next((p for p in _image_strings(record) if _is_relative(p)), None)
                if found is not None:
                    return found
    except Exception:  # noqa: BLE001 - a peek only: the build reports unreadable records itself
        return None
    return None


def _rewritten(path: str, rewrite: str | None) -> str:
    """The path after the source's `image_path` rewrite (as the reader applies it)."""
    if not rewrite:
        return path
    p = PurePosixPath(path)
    try:
        return rewrite.format(path=path, name=p.name, stem=p.stem, parent=str(p.parent))
    except (KeyError, IndexError, ValueError):
        return path


def _image_strings(node: Any, key: str = "") -> Iterator[str]:
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _image_strings(v, str(k))
    elif isinstance(node, list):
        for v in node:
            yield from _image_strings(v, key)
    elif isinstance(node, str) and key in IMAGE_KEYS and node.lower().endswith(IMAGE_EXTS):
        yield node


def _is_relative(path: str) -> bool:
    return not (os.path.isabs(path) or "://" in path or path.startswith("data:"))
