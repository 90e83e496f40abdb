"""Image values in records → checked `ImageRef`s, and a cheap probe of an image's size and format.

A path is resolved under the source's image root and never outside it (`..`, absolute paths elsewhere
and symlinks that escape are rejected), so a recipe cannot make a build read arbitrary files.
"""
from __future__ import annotations

import base64
import binascii
import io
import os
import posixpath
from dataclasses import dataclass
from functools import lru_cache
from pathlib import PurePosixPath
from typing import Any

from mlan.sources.records import ImageRef, RecordError

# PIL format name → the file extension a shard stores the image under
_EXTS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff", "MPO": "jpg"}


@dataclass(frozen=True)
class ImageContext:
    """Where a record's images may come from: the root relative paths resolve under, and the path rewrite."""

    root: str | None  # local folder or fsspec URL; None: only bytes / data URLs are accepted
    rewrite: str | None = None  # SourceSpec.image_path: format string over {path, name, stem, parent}
    file: str = ""  # for error messages
    index: int | None = None


@lru_cache(maxsize=256)
def _real_root(root: str) -> str:
    return os.path.realpath(root)


def decode_data_url(url: str) -> bytes:
    """`data:image/png;base64,....` → the encoded image bytes."""
    header, sep, payload = url.partition(",")
    if not sep or not header.startswith("data:"):
        raise ValueError("not a data: URL")
    if header.endswith(";base64"):
        return base64.b64decode(payload, validate=True)
    from urllib.parse import unquote_to_bytes

    return unquote_to_bytes(payload)


def encode_pil(image: Any) -> bytes:
    """A decoded PIL image (e.g. from a Hugging Face `Image` feature) → PNG bytes (lossless)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _rewrite(path: str, template: str, ctx: ImageContext, field: str) -> str:
    p = PurePosixPath(path)
    try:
        return template.format(path=path, name=p.name, stem=p.stem, parent=str(p.parent))
    except (KeyError, IndexError, ValueError) as err:
        raise RecordError(ctx.file, ctx.index, f"image_path {template!r} cannot rewrite {path!r}: {err}", field) from None


def resolve_path(path: str, ctx: ImageContext, field: str) -> ImageRef:
    """A path written in a record → an `ImageRef` to an existing file inside the image root."""
    if ctx.rewrite:
        path = _rewrite(path, ctx.rewrite, ctx, field)
    path = path.removeprefix("file://")
    if path.startswith(("http://", "https://")):
        raise RecordError(ctx.file, ctx.index, f"remote image URL {path!r} is not fetched at build time; "
                          "download the images and set the source's `images:` root", field)
    if ctx.root is None:
        raise RecordError(ctx.file, ctx.index, f"image path {path!r} has no image root; set `images:` on the source", field)
    root = ctx.root.removeprefix("file://")
    if "://" in root:  # remote root (s3://, gs://, ...): lexical containment, existence via fsspec
        return _resolve_remote(path, root, ctx, field)
    full = os.path.normpath(path if os.path.isabs(path) else os.path.join(root, path))
    real_root = _real_root(root)
    if not _inside(os.path.abspath(full), os.path.abspath(root)) and not _inside(os.path.realpath(full), real_root):
        raise RecordError(ctx.file, ctx.index, f"image path {path!r} is outside the image root {root}", field)
    real = os.path.realpath(full)
    if not _inside(real, real_root):
        raise RecordError(ctx.file, ctx.index, f"image path {path!r} is a link that escapes the image root {root}", field)
    if not os.path.isfile(real):
        raise RecordError(ctx.file, ctx.index, f"image file not found: {full}", field)
    return ImageRef(path=os.path.abspath(full))


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _resolve_remote(path: str, root: str, ctx: ImageContext, field: str) -> ImageRef:
    import fsspec

    if "://" in path or path.startswith("/"):
        full = path
    else:
        scheme, _, rest = root.partition("://")
        full = f"{scheme}://{posixpath.normpath(posixpath.join(rest, path))}"
    if not _inside(full, root.rstrip("/")):
        raise RecordError(ctx.file, ctx.index, f"image path {path!r} is outside the image root {root}", field)
    fs, fs_path = fsspec.core.url_to_fs(full)
    if not fs.isfile(fs_path):
        raise RecordError(ctx.file, ctx.index, f"image file not found: {full}", field)
    return ImageRef(path=full)


def to_image_ref(value: Any, ctx: ImageContext, field: str) -> ImageRef:
    """Any image value a record may hold (path, data URL, bytes, HF Image feature dict, PIL image) → ImageRef."""
    if isinstance(value, str):
        if value.startswith("data:"):
            try:
                return ImageRef(data=decode_data_url(value))
            except (ValueError, binascii.Error) as err:
                raise RecordError(ctx.file, ctx.index, f"bad data: URL for an image: {err}", field) from None
        if not value:
            raise RecordError(ctx.file, ctx.index, "empty image path", field)
        return resolve_path(value, ctx, field)
    if isinstance(value, (bytes, bytearray, memoryview)):
        if not value:
            raise RecordError(ctx.file, ctx.index, "empty image bytes", field)
        return ImageRef(data=bytes(value))
    if isinstance(value, dict):  # Hugging Face Image feature (decode=False) / parquet struct {bytes, path}
        if value.get("bytes"):
            return ImageRef(data=bytes(value["bytes"]))
        if value.get("path"):
            return to_image_ref(value["path"], ctx, f"{field}.path")
        if "url" in value:  # {"url": ...} as in OpenAI image_url parts
            return to_image_ref(value["url"], ctx, f"{field}.url")
        raise RecordError(ctx.file, ctx.index, f"image object has neither bytes nor path (keys: {sorted(value)})", field)
    if hasattr(value, "save") and hasattr(value, "size") and hasattr(value, "mode"):  # PIL.Image.Image
        return ImageRef(data=encode_pil(value))
    if value is None:
        raise RecordError(ctx.file, ctx.index, "image is null", field)
    raise RecordError(ctx.file, ctx.index, f"unsupported image value of type {type(value).__name__}", field)


def probe_image(ref: ImageRef, file: str, index: int | None) -> tuple[int, int, str]:
    """(width, height, ext) from the image header, verified by PIL; a bad image is a per-record error."""
    from PIL import Image as PILImage

    try:
        if ref.data is not None:
            fp: Any = io.BytesIO(ref.data)
        elif "://" in ref.path:
            fp = io.BytesIO(ref.read_bytes())
        else:
            fp = ref.path
        with PILImage.open(fp) as img:
            width, height = img.size
            fmt = img.format or ""
            img.verify()
    except FileNotFoundError:
        raise RecordError(file, index, f"undecodable image: file not found: {ref.path}", "image") from None
    except Exception as err:  # noqa: BLE001 - PIL raises many types (UnidentifiedImageError, SyntaxError, ...)
        where = ref.path if ref.path is not None else f"{len(ref.data or b'')} bytes"
        raise RecordError(file, index, f"undecodable image ({where}): {type(err).__name__}: {err}", "image") from None
    if width <= 0 or height <= 0:
        raise RecordError(file, index, f"undecodable image: empty size {width}x{height}", "image")
    return width, height, _EXTS.get(fmt, fmt.lower() or ref.suffix)


def image_root(spec: Any) -> str | None:
    """The folder a source's relative image paths resolve under: `images:`, else the source file's folder."""
    return _default_root(spec.path, spec.images)


@lru_cache(maxsize=256)
def _default_root(path: str, images: str | None) -> str | None:
    if images:
        return images
    if path.startswith("hf:"):  # an explicit datasets path: a local folder is its own root
        local = path[3:]
        return os.path.abspath(local) if os.path.isdir(local) else None
    if "://" in path:
        if path.startswith("file://"):
            path = path[len("file://"):]
        else:
            import fsspec

            fs, fs_path = fsspec.core.url_to_fs(path)
            scheme = path.split("://", 1)[0]
            folder = fs_path if fs.isdir(fs_path) else posixpath.dirname(fs_path)
            return f"{scheme}://{folder}"
    if os.path.isdir(path):
        return os.path.abspath(path)
    if os.path.isfile(path):
        return os.path.dirname(os.path.abspath(path))
    return None  # a Hugging Face hub id: images come as bytes, or under an explicit `images:` root
