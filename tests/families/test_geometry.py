"""ModelGeometry: the manifest's `family_config`, typed, written and read by one pair of functions."""
from __future__ import annotations

import json
from dataclasses import fields

import pytest
import shardkit

from mlan.data.collate import checked_geometry, family_collate
from mlan.families.base import GeometryError, ModelGeometry
from mlan.families.registry import get_family
from mlan.mixture.shards import ManifestError, read_manifest
from mlan.recipe import ModelSpec

# the manifest's family_config keys, in the order every build so far has written them (docs/spec.md)
MANIFEST_KEYS = ["family", "vocab_size", "image_token_id", "image_tokens", "image_size", "patch_size", "tile_size",
                 "max_tiles"]


@pytest.mark.parametrize("family", ["llava", "mllama"])
def test_a_family_writes_its_geometry_as_the_manifest_always_had_it(family):
    """The keys, their order and their JSON are the manifest's of before: a build's bytes do not change."""
    rendered = get_family(ModelSpec(family=family))
    geometry = rendered.model_geometry()
    manifest = rendered.family_config()
    assert list(manifest) == MANIFEST_KEYS == [f.name for f in fields(ModelGeometry)]
    assert manifest == {
        "family": family,
        "vocab_size": rendered.vocab_size(),
        "image_token_id": rendered.image_token_id,
        "image_tokens": rendered.image_seq_tokens(),
        "image_size": rendered.geometry.image_size,
        "patch_size": rendered.geometry.patch_size,
        "tile_size": rendered.tile_size(),
        "max_tiles": rendered.geometry.max_tiles,
    }
    assert ModelGeometry.from_manifest(json.loads(json.dumps(manifest))) == geometry  # through JSON and back


@pytest.mark.parametrize("key,value,message", [
    ("vocab_size", "128257", "family_config.vocab_size: '128257' is not a positive integer"),
    ("vocab_size", True, "family_config.vocab_size: 'True' is not a positive integer"),
    ("image_token_id", -3, "family_config.image_token_id: '-3' is not a token id"),
    ("image_tokens", 1.5, "family_config.image_tokens: '1.5' is not a positive integer"),
    ("tile_size", [560], "family_config.tile_size: '[560]' is not a positive integer"),
    ("family", 7, "family_config.family: '7' is not a family name"),
])
def test_a_value_of_the_wrong_type_is_one_line_naming_the_key(key, value, message):
    with pytest.raises(GeometryError) as err:
        ModelGeometry.from_manifest({**shardkit.LLAVA_FC, key: value})
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_missing_and_null_keys():
    with pytest.raises(GeometryError, match=r"^family_config.vocab_size: missing$"):
        ModelGeometry.from_manifest({"family": "llava"})
    with pytest.raises(GeometryError, match=r"^family_config.family: missing$"):
        ModelGeometry.from_manifest({"vocab_size": 5})
    with pytest.raises(GeometryError, match="family_config is a list"):
        ModelGeometry.from_manifest([1])
    text_only = ModelGeometry.from_manifest({"family": "llava", "vocab_size": 10, "image_token_id": None, "x": 1})
    assert text_only == ModelGeometry("llava", 10)  # null and missing take the defaults; unknown keys ignored
    assert text_only.image_token_id is None and text_only.image_tokens == 1


def test_read_manifest_names_the_file_and_the_key_of_a_wrongly_typed_geometry(tmp_path):
    """Defect: a manifest whose family_config.image_tokens was a string passed read_manifest and failed later,
    deep in the collator or the model build."""
    rows = shardkit.random_rows(4, seed=2, family_config=shardkit.LLAVA_FC)
    build = shardkit.write_build(tmp_path / "b", rows, shardkit.LLAVA_FC)
    manifest = read_manifest(str(build))
    assert manifest.geometry == ModelGeometry.from_manifest(shardkit.LLAVA_FC)
    assert manifest.geometry.image_tokens == shardkit.LLAVA_FC["image_tokens"]
    path = build / "manifest.json"
    data = json.loads(path.read_text())
    data["family_config"]["image_tokens"] = "16"
    path.write_text(json.dumps(data))
    with pytest.raises(ManifestError) as err:
        read_manifest(str(build))
    assert str(err.value) == f"{path}: family_config.image_tokens: '16' is not a positive integer"


def test_the_collator_takes_the_geometry_or_its_manifest_form():
    geometry = ModelGeometry.from_manifest(shardkit.MLLAMA_FC)
    assert checked_geometry(shardkit.MLLAMA_FC) == geometry == checked_geometry(geometry)
    assert family_collate(shardkit.MLLAMA_FC).geometry == family_collate(geometry).geometry == geometry
    with pytest.raises(ValueError, match="family_config.family: expected 'llava' or 'mllama', got 'qwen'"):
        checked_geometry(ModelGeometry("qwen", 10))
