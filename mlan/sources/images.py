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
import re
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import unquote_to_bytes

import fsspec
import numpy as np
from PIL import Image as PILImage
from PIL import ImageOps

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
    if "\0" in path:  # no file system has such a name; os.path would raise ValueError
        raise RecordError(ctx.file, ctx.index, f"image path {path!r} contains a NUL character", field)
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


@dataclass(frozen=True)
class ImageLimits:
    """What an image may be before it is decoded (read from the header): a cheap guard against decode bombs.

    The defaults admit every real photo (a 108-MP phone sensor is 12000×9000; a phone panorama is under
    10:1) and refuse what only a crafted file is (a 17 KB 12000×12000 1-bit PNG, a 1×20000 strip).
    """

    max_pixels: int = 120_000_000
    max_aspect: float = 20.0


DEFAULT_LIMITS = ImageLimits()

# JPEGs are decoded by libjpeg's DCT scaling (PIL draft) to no less than this on each side: the full entropy
# stream is still read (truncation is still caught), but a 100-MP photo costs a fraction of a full decode.
# 2 × the largest Mllama canvas side (4 × 560): tiling and CLIP resizing see the same picture either way.
DRAFT_MIN_SIDE = 4480
# EXIF Orientation values that swap width and height (transpose, 90°, transverse, 270°)
_SWAPS_AXES = {5, 6, 7, 8}
_EXIF_ORIENTATION = 0x0112


# PIL modes of more than 8 bits per sample: `convert("RGB")` clips them at 255 (a 16-bit PNG comes out
# almost all white), so they are scaled to 8 bits first (to_8bit)
HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def to_8bit(img: Any) -> Any:
    """A high-depth single-channel image → mode `L`, scaled linearly (anything else: unchanged).

    16-bit integers: 0..65535 → 0..255. 32-bit integers: as 16-bit when they fit in 0..65535 (a 16-bit PNG
    opens as `I`), else their own min..max. Floats: 0..1 → 0..255 when they lie in [0, 1] (the usual
    convention), else their own min..max; NaN is 0.
    """
    if img.mode not in HIGH_DEPTH_MODES:
        return img
    values = np.asarray(img).astype(np.float64)
    if values.size == 0:
        return img.convert("L")
    values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = float(values.min()), float(values.max())
    if img.mode.startswith("I;16") or (img.mode == "I" and lo >= 0 and hi <= 65535):
        scaled = values * (255.0 / 65535.0)
    elif img.mode == "F" and lo >= 0 and hi <= 1:
        scaled = values * 255.0
    else:
        scaled = (values - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(values)
    return PILImage.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")


def open_oriented(data: bytes):
    """Encoded bytes → a fully decoded RGB PIL image, EXIF orientation applied, JPEGs drafted, high-depth
    images scaled to 8 bits (to_8bit).

    The one decode used at build time (check, pre_resize) and in the loader, so both see the same pixels.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PILImage.DecompressionBombWarning)  # our own limits apply instead
        with PILImage.open(io.BytesIO(data)) as img:
            if img.format in ("JPEG", "MPO"):  # MPO: phone photos (a JPEG with extra frames)
                img.draft("RGB", (DRAFT_MIN_SIDE, DRAFT_MIN_SIDE))
            img.load()
            oriented = ImageOps.exif_transpose(img)
            return to_8bit(oriented).convert("RGB")


def stored_8bit(data: bytes) -> bytes | None:
    """PNG bytes of a high-depth image scaled to 8 bits (the build stores these); None when the image
    already has 8 bits per sample (stored as it is). Reads the header only for the common case."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PILImage.DecompressionBombWarning)
        with PILImage.open(io.BytesIO(data)) as img:
            if img.mode not in HIGH_DEPTH_MODES:
                return None
    buf = io.BytesIO()
    open_oriented(data).convert("L").save(buf, format="PNG")
    return buf.getvalue()


def _reason(err: BaseException) -> str:
    """PIL's message without the memory address of the file object it was given."""
    text = re.sub(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>", "", str(err)).strip()
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def probe_image(ref: ImageRef, file: str, index: int | None, where: str | None = None,
                limits: ImageLimits = DEFAULT_LIMITS) -> tuple[int, int, str]:
    """(width, height, ext) of an image as the loader will see it (EXIF orientation applied).

    Header first: size and format, then the pixel and aspect limits (`limits`: the recipe's), so
    a decode bomb is refused before any pixel is decoded; then a full decode, so a truncated or corrupt
    image is rejected here and not in every later training run. `where` names the image (its path).
    """
    where = where or ref.path or f"{len(ref.data or b'')} bytes of image data"
    try:
        data = ref.read_bytes()
    except FileNotFoundError:
        raise RecordError(file, index, f"undecodable image: file not found: {ref.path}", "image") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PILImage.DecompressionBombWarning)
            with PILImage.open(io.BytesIO(data)) as img:
                width, height = img.size
                fmt = img.format or ""
                orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception as err:  # noqa: BLE001 - PIL raises many types (UnidentifiedImageError, SyntaxError, ...)
        raise RecordError(file, index, f"undecodable image ({where}): {_reason(err)}", "image") from None
    if width <= 0 or height <= 0:
        raise RecordError(file, index, f"undecodable image ({where}): empty size {width}x{height}", "image")
    if width * height > limits.max_pixels:
        raise RecordError(file, index, f"image too large ({where}): {width}x{height} = {width * height:,} pixels, "
                          f"more than mixture.max_image_pixels = {limits.max_pixels:,}", "image")
    aspect = max(width, height) / min(width, height)
    if aspect > limits.max_aspect:
        raise RecordError(file, index, f"image too elongated ({where}): {width}x{height} has aspect ratio "
                          f"{aspect:.4g}, more than mixture.max_image_aspect = {limits.max_aspect:g}", "image")
    try:
        open_oriented(data)
    except Exception as err:  # noqa: BLE001 - truncated / corrupt pixel data
        raise RecordError(file, index, f"undecodable image ({where}): {_reason(err)}", "image") from None
    if orientation in _SWAPS_AXES:
        width, height = height, width
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
            fs, fs_path = fsspec.core.url_to_fs(path)
            scheme = path.split("://", 1)[0]
            folder = fs_path if fs.isdir(fs_path) else posixpath.dirname(fs_path)
            return f"{scheme}://{folder}"
    if os.path.isdir(path):
        return os.path.abspath(path)
    if os.path.isfile(path):
        return os.path.dirname(os.path.abspath(path))
    return None  # a Hugging Face hub id: images come as bytes, or under an explicit `images:` root
