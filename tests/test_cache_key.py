"""The tokenized-cache key misses on every knob that shapes a document, and only on those.

A stale hit trains on documents rendered under other settings, silently; each knob below is changed alone.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlan.mixture import cache as tcache
from mlan.recipe import load_recipe

RECIPE = """
model: {family: llava, tokenizer: llama3, config: tiny, image_tokens: 16}
sources:
  - {name: chat, path: data/chat.json, format: alpaca, modality: text}
  - {name: pics, path: data/pics.json, format: llava, modality: image_text, images: data/img}
mixture: {budget: {tokens: 10000}, seq_len: 1024}
"""


@pytest.fixture()
def recipe_dir(tmp_path: Path) -> Path:
    (tmp_path / "data" / "img").mkdir(parents=True)
    (tmp_path / "data" / "chat.json").write_text(json.dumps([{"instruction": "hi", "output": "hello"}]))
    (tmp_path / "data" / "pics.json").write_text(json.dumps(
        [{"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nwhat?"},
                                              {"from": "gpt", "value": "a square"}]}]))
    (tmp_path / "data" / "img" / "a.png").write_bytes(b"not really a png, only hashed")
    (tmp_path / "r.yaml").write_text(RECIPE)
    return tmp_path


def _keys(recipe_dir: Path, *overrides: str, tokenizer_fp: str = "tok") -> tuple[str, str]:
    recipe = load_recipe(recipe_dir / "r.yaml", list(overrides))
    return tuple(tcache.source_fingerprint(recipe, s, tokenizer_fp, "code") for s in recipe.sources)


@pytest.mark.parametrize("override", [
    "model.template=vicuna_v1",
    "model.image_tokens=32",
    "model.image_size=112",
    "model.family=mllama",
    "mixture.seq_len=2048",
    "mixture.overlong=drop",
    "shards.pre_resize=true",
])
def test_each_render_knob_misses_the_cache(recipe_dir: Path, override: str) -> None:
    base = _keys(recipe_dir)
    changed = _keys(recipe_dir, override)
    assert changed[0] != base[0] and changed[1] != base[1], override


def test_tokenizer_and_code_miss_the_cache(recipe_dir: Path) -> None:
    recipe = load_recipe(recipe_dir / "r.yaml")
    src = recipe.sources[0]
    base = tcache.source_fingerprint(recipe, src, "tok", "code")
    assert tcache.source_fingerprint(recipe, src, "other-tok", "code") != base
    assert tcache.source_fingerprint(recipe, src, "tok", "other-code") != base


def test_source_content_and_images_miss_only_their_source(recipe_dir: Path) -> None:
    base = _keys(recipe_dir)
    (recipe_dir / "data" / "chat.json").write_text(json.dumps([{"instruction": "hi", "output": "hello!"}]))
    after_text = _keys(recipe_dir)
    assert after_text[0] != base[0] and after_text[1] == base[1]
    (recipe_dir / "data" / "img" / "b.png").write_bytes(b"another image")
    after_image = _keys(recipe_dir)
    assert after_image[1] != after_text[1] and after_image[0] == after_text[0]


@pytest.mark.parametrize("override", ["sources.chat.weight=3", "mixture.budget.tokens=999",
                                      "mixture.ratio.text=0.5", "mixture.seed=7"])
def test_mixing_knobs_keep_the_cache(recipe_dir: Path, override: str) -> None:
    assert _keys(recipe_dir, override) == _keys(recipe_dir)
