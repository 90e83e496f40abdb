"""Issue #22 item 3, images: no silent damage.

A source with no `images:` root read changed or truncated images from a stale cache (the shards came out
identical to the old ones); a 16-bit PNG was stored 99.6 % white and a float TIFF mostly white or black.
Real builds on one local Ray for the module; the stored images are read back with tarfile + PIL + numpy.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

pytestmark = [pytest.mark.timeout(300)]


def _build(folder: Path, names: list[str], out: Path, cache: Path) -> dict:
    """Build one image_text source (pics.jsonl in `folder`, one image per record, no `images:` root)."""
    from mlan.mixture.build import build
    from mlan.recipe import load_recipe

    recs = [{"messages": [{"role": "user", "content": "<image>Describe."}, {"role": "assistant", "content": n}],
             "images": [n]} for n in names]
    (folder / "pics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    raw = {"model": {"family": "llava", "image_tokens": 8},
           "sources": [{"name": "pics", "path": str(folder / "pics.jsonl"), "format": "messages",
                        "modality": "image_text"}],
           "mixture": {"budget": {"examples": len(names)}, "ratio": {"text": 0.0}, "seq_len": 256}}
    (folder / "r.yaml").write_text(yaml.safe_dump(raw))
    return build(load_recipe(folder / "r.yaml"), str(out), workers=1, cache_dir=str(cache), progress=False)


def _stored_images(out: Path) -> list[bytes]:
    """Every image member of every shard, read with tarfile only."""
    manifest = json.loads((out / "manifest.json").read_text())
    found = []
    for s in manifest["shards"]:
        with tarfile.open(out / s["name"]) as tar:
            found += [tar.extractfile(m).read() for m in tar.getmembers() if ".img" in m.name]
    return found


@pytest.mark.slow  # ~25 s: two real builds over one cache
def test_changed_or_truncated_images_miss_the_cache_without_an_images_root(local_ray, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (40, 30), (200, 0, 0)).save(data / "a.bmp")  # BMP: a rewrite keeps its size exactly
    Image.new("RGB", (50, 30), (0, 200, 0)).save(data / "b.png")
    cache = tmp_path / "cache"
    _build(data, ["a.bmp", "b.png"], tmp_path / "out1", cache)
    assert sorted(map(len, _stored_images(tmp_path / "out1"))) == sorted(
        [(data / "a.bmp").stat().st_size, (data / "b.png").stat().st_size])

    # a.bmp: new pixels, same size, old mtime restored; b.png: truncated
    before = (data / "a.bmp").stat()
    Image.new("RGB", (40, 30), (0, 0, 222)).save(data / "a.bmp")
    os.utime(data / "a.bmp", ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (data / "a.bmp").stat().st_size == before.st_size
    (data / "b.png").write_bytes((data / "b.png").read_bytes()[:60])
    stats = _build(data, ["a.bmp", "b.png"], tmp_path / "out2", cache)

    stored = _stored_images(tmp_path / "out2")
    assert stored and all(im == (data / "a.bmp").read_bytes() for im in stored)  # the new pixels
    assert np.asarray(Image.open(io.BytesIO(stored[0])))[0, 0].tolist() == [0, 0, 222]
    assert stats["records"]["pics"]["rejected"] == 1  # the truncated one, not read from the old cache
    (bad,) = [json.loads(x) for x in (tmp_path / "out2" / "rejected.jsonl").read_text().splitlines()]
    assert bad["index"] == 1 and "undecodable image" in bad["reason"]


def test_high_depth_images_are_stored_as_8_bits_scaled(local_ray, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    ramp16 = np.tile(np.linspace(0, 65535, 256).round().astype(np.uint16), (16, 1))  # 256 wide
    Image.fromarray(ramp16).save(data / "r16.png")
    rampf = np.tile(np.linspace(0.0, 1.0, 200, dtype=np.float32), (16, 1))  # 200 wide
    Image.fromarray(rampf, mode="F").save(data / "rf.tiff")
    ramp32 = np.tile(np.linspace(-1000, 1_000_000, 300).round().astype(np.int32), (16, 1))  # 300 wide
    Image.fromarray(ramp32, mode="I").save(data / "ri.tiff")
    assert [Image.open(data / n).mode for n in ("r16.png", "rf.tiff", "ri.tiff")] == ["I;16", "F", "I"]
    _build(data, ["r16.png", "rf.tiff", "ri.tiff"], tmp_path / "out", tmp_path / "cache")

    expected = {256: ramp16 / 65535 * 255, 200: rampf * 255.0, 300: (ramp32 + 1000) / 1_001_000 * 255}
    seen = set()
    for data_bytes in _stored_images(tmp_path / "out"):
        im = Image.open(io.BytesIO(data_bytes))
        assert im.mode in ("L", "RGB"), im.mode  # 8 bits per sample
        pixels = np.asarray(im.convert("L"), dtype=np.float64)
        ref = expected[im.width]
        seen.add(im.width)
        assert abs(pixels.mean() - ref.mean()) < 0.6, (im.width, pixels.mean(), ref.mean())
        assert pixels.min() == 0 and pixels.max() == 255
        assert np.abs(pixels - ref).max() <= 0.5 + 1e-9  # each pixel: the ramp scaled, rounded
    assert seen == {256, 200, 300}
