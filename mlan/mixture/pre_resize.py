"""`shards.pre_resize`: images stored at the family's resolution (smaller shards, no resize in the loader).

Its output lands in the tokenized cache, so this module is part of the cache key's code hash.
"""
from __future__ import annotations

import io

from PIL import Image

from mlan.render import Document, Renderer
from mlan.sources.images import open_oriented


def pre_resize(doc: Document, renderer: Renderer) -> Document:
    """Store images at the family's resolution (smaller shards, no resize in the loader)."""
    family = getattr(renderer, "family", None)
    geometry = getattr(family, "geometry", None)
    size = getattr(geometry, "image_size", None)
    if not size:
        return doc
    tiles = max(1, int(getattr(geometry, "max_tiles", 1)))
    images, exts, sizes = [], [], []
    for data in doc.images:
        im = open_oriented(data)  # the loader's decode: EXIF orientation applied, so none is stored
        if tiles == 1:  # llava: the vision tower's square input
            im = im.resize((size, size), Image.BICUBIC)
        else:  # mllama: fit inside the largest tile canvas, keeping the aspect ratio
            scale = min(1.0, size * tiles / max(im.size))
            im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.BICUBIC)
        buf = io.BytesIO()
        im.save(buf, format="PNG", optimize=False)
        images.append(buf.getvalue())
        exts.append("png")
        sizes.append(im.size)
    doc.images, doc.image_exts, doc.image_sizes = images, exts, sizes
    return doc
