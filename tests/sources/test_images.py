"""Images at build time (issue 11, item 4): full decode, header limits before decoding, bounded JPEG decode,
EXIF orientation applied the same way at build and load time, reasons that name the file."""
from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mlan.data.images import ImageDecodeError, decode_image
from mlan.sources.images import probe_image
from mlan.sources.records import ImageRef, RecordError


def jpeg_bytes(width: int, height: int, exif_orientation: int | None = None, mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 255, size=(height, width, 3) if mode == "RGB" else (height, width), dtype=np.uint8)
    im = Image.fromarray(arr, mode)
    buf = io.BytesIO()
    if exif_orientation is None:
        im.save(buf, format="JPEG", quality=90)
    else:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        im.save(buf, format="JPEG", quality=90, exif=exif.tobytes())
    return buf.getvalue()


def test_truncated_jpeg_is_rejected_with_its_path(tmp_path: Path):
    """Defect: Image.verify() does not decode JPEG data, so a truncated JPEG passed and broke training."""
    data = jpeg_bytes(64, 48)
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(RecordError) as err:
        probe_image(ImageRef(path=str(path)), "data.jsonl", 7)
    msg = str(err.value)
    assert "undecodable image" in msg and str(path) in msg and "record 7" in msg and "truncated" in msg
    with pytest.raises(ImageDecodeError):  # the loader agrees
        decode_image(path.read_bytes(), "row x: img0.jpg")
    assert probe_image(ImageRef(data=data), "data.jsonl", 7) == (64, 48, "jpg")


def test_reason_names_the_path_and_no_memory_address():
    """Defect: reasons read `cannot identify image file <_io.BytesIO object at 0x…>` with no path."""
    with pytest.raises(RecordError) as err:
        probe_image(ImageRef(data=b"not an image at all"), "data.jsonl", 3, where="/imgs/a.png")
    msg = str(err.value)
    assert "/imgs/a.png" in msg and " at 0x" not in msg and "BytesIO" not in msg, msg


def _png(width: int, height: int, mode: str = "1") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (width, height)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def test_decode_bombs_refused_from_the_header():
    """Defect: a 17 KB 12000×12000 1-bit PNG and a 1×20000 PNG passed and cost GBs per decode in the loader."""
    bomb = _png(12000, 12000)
    strip = _png(1, 20000)
    assert len(bomb) < 64_000 and len(strip) < 1000
    t0 = time.perf_counter()
    with pytest.raises(RecordError, match=r"too large .*144,000,000 pixels, more than mixture.max_image_pixels"):
        probe_image(ImageRef(data=bomb), "d.jsonl", 0)
    with pytest.raises(RecordError, match=r"too elongated .*aspect ratio 2e\+04, more than mixture.max_image_aspect"):
        probe_image(ImageRef(data=strip), "d.jsonl", 1)
    assert time.perf_counter() - t0 < 1.0  # refused from the header: nothing decoded
    from mlan.sources.images import ImageLimits

    # the limits are the recipe's: looser limits admit the strip
    assert probe_image(ImageRef(data=strip), "d.jsonl", 1, limits=ImageLimits(max_aspect=30000)) == (1, 20000, "png")


def test_default_limits_admit_real_photo_shapes():
    """A 108-MP phone photo's shape and a 4:1 64-MP phone panorama pass the header limits (checked without decoding)."""
    from mlan.sources.images import ImageLimits

    lim = ImageLimits()
    for w, h in [(12000, 9000), (9000, 12000), (16000, 4000), (4000, 16000), (4032, 3024), (640, 480)]:
        assert w * h <= lim.max_pixels and max(w, h) / min(w, h) <= lim.max_aspect


def test_large_jpeg_decode_is_bounded():
    """A JPEG larger than 2 × DRAFT_MIN_SIDE on each side is decoded by DCT scaling, not at full size."""
    from mlan.sources.images import DRAFT_MIN_SIDE

    side = 2 * DRAFT_MIN_SIDE + 200
    data = jpeg_bytes(side, side, mode="L")
    img = decode_image(data, "row x: img0.jpg")
    assert DRAFT_MIN_SIDE <= min(img.size) < side
    assert probe_image(ImageRef(data=data), "d.jsonl", 0) == (side, side, "jpg")  # sizes are the header's


@pytest.mark.parametrize("orientation,swapped", [(1, False), (3, False), (6, True), (8, True)])
def test_exif_orientation_applied_at_build_and_load(orientation: int, swapped: bool):
    """Defect: EXIF orientation was ignored; sizes (and Mllama tiles) now are those of the upright image."""
    from mlan.families.mllama.geometry import tile_grid

    data = jpeg_bytes(120, 40, exif_orientation=orientation)
    want = (40, 120) if swapped else (120, 40)
    w, h, ext = probe_image(ImageRef(data=data), "d.jsonl", 0)
    assert (w, h, ext) == (*want, "jpg")
    img = decode_image(data, "row x: img0.jpg")
    assert img.size == want
    # the reference: PIL's own transpose of the decoded pixels
    from PIL import ImageOps

    ref = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    assert np.array_equal(np.asarray(img), np.asarray(ref))
    assert tile_grid(w, h, 4, 56) == tile_grid(*img.size, 4, 56)


def test_image_policy_is_in_the_cache_key(tmp_path: Path):
    """The image limits and the decode policy (EXIF applied) are part of every source's cache key."""
    from mlan.families.registry import get_family
    from mlan.mixture.cache_key import IMAGE_DECODE, source_cache_keys
    from mlan.recipe import parse_recipe

    src = {"name": "s", "path": str(tmp_path / "d.jsonl"), "format": "llava", "modality": "image_text"}
    (tmp_path / "d.jsonl").write_text("{}\n")
    a = parse_recipe({"sources": [src]})
    b = parse_recipe({"sources": [src], "mixture": {"max_image_pixels": 1000}})
    c = parse_recipe({"sources": [src], "mixture": {"max_image_aspect": 3}})
    fps = {source_cache_keys(r, get_family(r.model).family_config())[0] for r in (a, b, c)}
    assert len(fps) == 3
    assert "exif" in IMAGE_DECODE


def test_each_renderer_applies_its_own_image_limits(llama3_tokenizer):
    """The limits belong to a renderer (a build's tokenizer actor), not to the process: two renderers with
    different limits, side by side, each refuse or admit the same image by their own."""
    from mlan.recipe import ModelSpec
    from mlan.render import Renderer
    from mlan.sources.images import ImageLimits
    from mlan.sources.records import Conversation, Message, Text
    from mlan.sources.records import Image as ImagePart

    conv = Conversation("s:0:x", "s", (
        Message("user", (ImagePart(ImageRef(data=jpeg_bytes(120, 40))), Text("What is this?"))),
        Message("assistant", (Text("A strip."),)),
    ), {"file": "d.jsonl", "index": 0})
    strict = Renderer(ModelSpec(), 4096, tokenizer=llama3_tokenizer, image_limits=ImageLimits(max_aspect=2.0))
    default = Renderer(ModelSpec(), 4096, tokenizer=llama3_tokenizer)
    with pytest.raises(RecordError, match=r"too elongated .*more than mixture.max_image_aspect = 2"):
        strict.render(conv)
    assert default.render(conv).image_sizes == [(120, 40)]
    with pytest.raises(RecordError, match="too elongated"):
        strict.render(conv)
