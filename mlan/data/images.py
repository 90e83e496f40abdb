"""Image decoding of packed rows, run inside DataLoader workers (the per-family processing that follows lives
in each family's `inputs` module, e.g. `mlan.families.llava.inputs`)."""
from __future__ import annotations

import re

from PIL import Image, UnidentifiedImageError

from mlan.errors import MlanError
from mlan.sources.images import open_oriented


class ImageDecodeError(MlanError, ValueError):
    """An image in a packed row that PIL cannot decode; the message names the row key and the image."""


def decode_image(data: bytes, where: str) -> Image.Image:
    """Encoded bytes → an RGB PIL image, EXIF orientation applied, by the build's own decode (so the tile
    counts and sizes the build recorded are those of this image); `where` names the row and image."""
    try:
        return open_oriented(data)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        reason = re.sub(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>", "", str(err))
        raise ImageDecodeError(f"{where}: cannot decode image ({type(err).__name__}: {reason})") from err
