"""The shard format's one module (mlan.mixture.shards): the manifest reader, the sha256 check and the key split,
against the bytes on disk (hashlib, json) and webdataset's own reading of the same tars; and the build's
image pre-resizing against transformers' Mllama image processor."""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image
from shardkit import LLAVA_FC, MLLAMA_FC, image_bytes, random_rows, write_build

from mlan.families.mllama.inputs import mllama_images
from mlan.mixture.pre_resize import pre_resize
from mlan.mixture.shards import (
    ManifestError,
    iter_tar_samples,
    read_manifest,
    row_to_sample,
    sha256_problem,
    split_key,
    write_tar,
)
from mlan.recipe import load_recipe
from mlan.render import Document, Renderer

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    return write_build(tmp_path_factory.mktemp("b"), random_rows(25, 1, LLAVA_FC), LLAVA_FC, rows_per_shard=10)


def test_manifest_fields_are_the_json(built):
    data = json.loads((built / "manifest.json").read_text())
    m = read_manifest(str(built))
    assert m.seq_len == data["seq_len"] and m.family_config == data["family_config"] and m.data == data
    assert [(s.name, s.rows, s.sha256) for s in m.shards] == [(s["name"], s["rows"], s["sha256"]) for s in data["shards"]]
    assert [hashlib.sha256(Path(s.url).read_bytes()).hexdigest() for s in m.shards] == [s.sha256 for s in m.shards]
    assert m.totals["rows"] == 25 == sum(s.rows for s in m.shards)


@pytest.mark.parametrize("edit, says", [
    (lambda t: t[:-3], "not valid JSON"),
    (lambda t: json.dumps({"shards": []}), "missing key 'seq_len'"),
    (lambda t: json.dumps({"seq_len": 8, "family_config": {}, "shards": [{"name": "x"}]}), "shards[0] has no 'rows'"),
    (lambda t: "[]", "no `shards` list"),
])
def test_bad_manifest_is_one_line_naming_the_file(built, tmp_path, edit, says):
    (tmp_path / "manifest.json").write_text(edit((built / "manifest.json").read_text()))
    with pytest.raises(ManifestError) as err:
        read_manifest(str(tmp_path))
    assert str(err.value).startswith(f"{tmp_path}/manifest.json: ") and says in str(err.value)
    assert "\n" not in str(err.value)
    with pytest.raises(FileNotFoundError, match="no manifest"):
        read_manifest(str(tmp_path / "nothing"))


def test_sha256_problem_names_the_shard(built, tmp_path):
    m = read_manifest(str(built))
    assert [sha256_problem(s) for s in m.shards] == [None] * len(m.shards)
    copy = tmp_path / "c"
    (copy / "shards").mkdir(parents=True)
    for f in ["manifest.json", *[s.name for s in m.shards]]:
        (copy / f).write_bytes((built / f).read_bytes())
    data = bytearray((copy / m.shards[1].name).read_bytes())
    data[700] ^= 1
    (copy / m.shards[1].name).write_bytes(bytes(data))
    (copy / m.shards[2].name).unlink()
    got = [sha256_problem(s) for s in read_manifest(str(copy)).shards]
    assert got[0] is None
    assert got[1].startswith("shards/shard-000001.tar: sha256 ") and hashlib.sha256(data).hexdigest() in got[1]
    assert got[2].startswith("shards/shard-000002.tar: shard file missing")


def test_key_split_and_grouping_are_webdatasets(built, tmp_path):
    """Our reader groups a tar into the same samples as webdataset's own pipeline, folders in names included."""
    for name in ["a/b.c.d", "x.y", "dir.v2/k.img0.png", "noext"]:
        want = wds.tariterators.base_plus_ext(name)
        assert split_key(name) == want
    tar = tmp_path / "t.tar"
    with tarfile.open(tar, "w") as tf:
        for name, payload in [("d/k1.a", b"1"), ("d/k1.b.npy", b"2"), ("noext", b"3"), ("k2.a", b"4")]:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    for path in [str(tar), *sorted(str(p) for p in (built / "shards").glob("*.tar"))]:
        theirs = [{k: v for k, v in s.items() if k == "__key__" or not k.startswith("__")}
                  for s in wds.WebDataset(path, shardshuffle=False)]
        with open(path, "rb") as f:
            mine = list(iter_tar_samples(f))
        assert mine == theirs


def test_write_tar_is_reproducible_and_webdataset_reads_it(tmp_path):
    rows = random_rows(4, 7, MLLAMA_FC, image_every=1)
    samples = []
    for i, row in enumerate(rows):
        row.key = f"000000-{i:06d}"
        samples.append(row_to_sample(row))
    a, b = io.BytesIO(), io.BytesIO()
    write_tar(a, samples)
    write_tar(b, samples)
    assert a.getvalue() == b.getvalue()
    (tmp_path / "s.tar").write_bytes(a.getvalue())
    read = [{k: v for k, v in s.items() if k == "__key__" or not k.startswith("__")} for s in wds.WebDataset(str(tmp_path / "s.tar"),
                                                                                  shardshuffle=False)]
    assert read == [{k: (v.encode() if isinstance(v, str) else v) for k, v in s.items() if k != "__key__"}
                    | {"__key__": s["__key__"]} for s in samples]


def _doc(images: list[bytes]) -> Document:
    return Document("d", "s", "image_text", np.zeros(len(images), np.uint32), np.zeros(len(images), np.uint8),
                    images=images, image_exts=["jpg"] * len(images))


@pytest.mark.parametrize("recipe", ["tiny-mllama", "tiny-llava"])
def test_pre_resize_keeps_what_the_loader_computes(recipe):
    """`shards.pre_resize` stores smaller images; the loader must see the same geometry as without it: the
    same Mllama tiles and aspect-ratio id (transformers' processor on the original vs the stored image), and
    for LLaVA the vision tower's square input."""
    spec = load_recipe(REPO / "recipes" / f"{recipe}.yaml").model
    renderer = Renderer(spec, 1024, "truncate")
    fc = renderer.family.family_config()
    sizes = [(64, 48), (300, 90), (90, 300), (500, 500), (1000, 80), (230, 225), (57, 56), (1200, 1190), (250, 60)]
    originals = [image_bytes(i, w, h) for i, (w, h) in enumerate(sizes)]
    doc = pre_resize(_doc(list(originals)), renderer)
    stored = [Image.open(io.BytesIO(b)).convert("RGB") for b in doc.images]
    assert doc.image_exts == ["png"] * len(sizes) and doc.image_sizes == [im.size for im in stored]
    if fc["family"] == "llava":
        assert {im.size for im in stored} == {(fc["image_size"], fc["image_size"])}
        return
    before = mllama_images([Image.open(io.BytesIO(b)).convert("RGB") for b in originals], fc["tile_size"],
                           fc["max_tiles"])
    after = mllama_images(stored, fc["tile_size"], fc["max_tiles"])
    assert after.num_tiles == before.num_tiles
    assert after.aspect_ratio_ids.tolist() == before.aspect_ratio_ids.tolist()
    assert [renderer.family.tiles_for(*im.size) for im in stored] == before.num_tiles
