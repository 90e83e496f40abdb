"""`shards.pre_resize`: images stored at the family's resolution (smaller shards, no resize in the loader).

Its output lands in the tokenized cache, so this module is part of the cache key's code hash.
"""
from __future__ import annotations

import io

from PIL import Image

from mlan.render import Document, Renderer
from mlan.sources.images import open_oriented, stored_8bit


def pre_resize(doc: Document, renderer: Renderer) -> Document:
    """Store images at the family's resolution (smaller shards, no resize in the loader)."""
    family = getattr(renderer, "family", None)
    geometry = getattr(family, "geometry", None)
    size = getattr(geometry, "image_size", None)
    if not size:
        return doc
    images, exts, sizes = [], [], []
    for data in doc.images:
        im = open_oriented(data)  # the loader's decode: EXIF orientation applied, so none is stored
        im = im.resize(family.stored_image_size(im.width, im.height), Image.BICUBIC)
        buf = io.BytesIO()
        im.save(buf, format="PNG", optimize=False)
        images.append(buf.getvalue())
        exts.append("png")
        sizes.append(im.size)
    doc.images, doc.image_exts, doc.image_sizes = images, exts, sizes
    return doc


def store_8bit(doc: Document) -> Document:
    """High-depth images (16-bit PNG, float or 32-bit TIFF) stored as 8-bit PNGs, scaled linearly: a reader
    that converts the original to RGB clips it at 255 (a 16-bit PNG reads back almost all white)."""
    for i, data in enumerate(doc.images):
        converted = stored_8bit(data)
        if converted is not None:
            doc.images[i] = converted
            doc.image_exts[i] = "png"
    return doc
