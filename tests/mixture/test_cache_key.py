"""The tokenized-cache key misses on every knob that shapes a document, and only on those.

A stale hit trains on documents rendered under other settings, silently; each knob below is changed alone,
through `source_cache_keys`, the one function the build names its caches with. The slow test runs the real
tokenize stage (Ray actors, Parquet parts) to show a miss re-tokenizes and a mixing knob reuses the parts.
"""
from __future__ import annotations

import inspect
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from mlan.families.registry import get_family
from mlan.mixture import cache as tcache
from mlan.mixture import cache_key
from mlan.mixture.cache_key import CODE_PATHS, code_fingerprint, source_cache_keys
from mlan.mixture.pre_resize import pre_resize
from mlan.mixture.tokenize import SourceCache, TokenizeWorker, tokenize_sources
from mlan.piece_encoding import PieceEncoder
from mlan.recipe import Recipe, load_recipe
from mlan.render import Renderer
from mlan.sources import iter_source, to_conversations
from mlan.sources.images import open_oriented
from mlan.templates import get_template

RECIPE = """
model: {family: llava, tokenizer: llama3, config: tiny, image_tokens: 16}
sources:
  - {name: chat, path: data/chat.json, format: alpaca, modality: text}
  - {name: pics, path: data/pics.json, format: llava, modality: image_text, images: data/img}
mixture: {budget: {tokens: 10000}, seq_len: 1024}
"""

# (override, a value that changes documents): each alone must give every source a new key
DOCUMENT_KNOBS = [
    "model.template=vicuna_v1",  # template
    "model.image_tokens=32",  # family geometry
    "model.image_size=112",
    "model.family=mllama",
    "mixture.seq_len=2048",
    "mixture.overlong=drop",
    "shards.pre_resize=true",  # image options
    "mixture.max_image_pixels=1000",
    "mixture.max_image_aspect=3",
    "mixture.max_record_bytes=100",
]
# per-source options: change the documents of that source only
SOURCE_KNOBS = ["limit=1", "split=test", "end_markers=[]"]
MIXING_KNOBS = ["sources.chat.weight=3", "sources.chat.upsample=false", "mixture.upsample=false",
                "mixture.budget.tokens=999", "mixture.ratio.text=0.5", "mixture.ratio.by=examples",
                "mixture.seed=7", "mixture.max_images_per_row=2", "mixture.pack_buffer_tokens=300000",
                "shards.target_tokens=1000", "train.lr=0.1", "mixture.max_upsample=5"]


def _png(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture()
def recipe_dir(tmp_path: Path) -> Path:
    (tmp_path / "data" / "img").mkdir(parents=True)
    (tmp_path / "data" / "chat.json").write_text(json.dumps([{"instruction": "hi", "output": "hello"},
                                                             {"instruction": "bye", "output": "goodbye"}]))
    (tmp_path / "data" / "pics.json").write_text(json.dumps(
        [{"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nwhat?"},
                                              {"from": "gpt", "value": "a square"}]}]))
    (tmp_path / "data" / "img" / "a.png").write_bytes(_png((200, 10, 10)))
    (tmp_path / "r.yaml").write_text(RECIPE)
    return tmp_path


def _recipe(recipe_dir: Path, *overrides: str) -> Recipe:
    return load_recipe(recipe_dir / "r.yaml", list(overrides))


def _keys(recipe_dir: Path, *overrides: str) -> list[str]:
    recipe = _recipe(recipe_dir, *overrides)
    return source_cache_keys(recipe, get_family(recipe.model).family_config())


@pytest.mark.parametrize("override", DOCUMENT_KNOBS)
def test_each_document_knob_misses_the_cache(recipe_dir: Path, override: str) -> None:
    base, changed = _keys(recipe_dir), _keys(recipe_dir, override)
    assert changed[0] != base[0] and changed[1] != base[1], override


@pytest.mark.parametrize("option", SOURCE_KNOBS)
def test_source_options_miss_only_their_source(recipe_dir: Path, option: str) -> None:
    base, changed = _keys(recipe_dir), _keys(recipe_dir, f"sources.chat.{option}")
    assert changed[0] != base[0] and changed[1] == base[1], option


def test_source_format_misses_the_cache(recipe_dir: Path) -> None:
    """The same file read as another format (sharegpt-style `conversations` under `llava`)."""
    base = _keys(recipe_dir)
    (recipe_dir / "r.yaml").write_text(RECIPE.replace("format: llava, modality: image_text",
                                                      "format: sharegpt, modality: image_text"))
    assert _keys(recipe_dir)[1] != base[1]


def test_tokenizer_files_miss_the_cache(recipe_dir: Path, llama3_tokenizer) -> None:
    """A tokenizer folder is keyed by its files' bytes, not only its name."""
    tok = recipe_dir / "tok"
    llama3_tokenizer.save_pretrained(tok)
    base = _keys(recipe_dir, f"model.tokenizer={tok}")
    assert base != _keys(recipe_dir)  # llama3 vs the folder
    config = json.loads((tok / "tokenizer_config.json").read_text())
    (tok / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 77}))
    changed = _keys(recipe_dir, f"model.tokenizer={tok}")
    assert changed[0] != base[0] and changed[1] != base[1]


def test_source_content_and_images_miss_only_their_source(recipe_dir: Path) -> None:
    base = _keys(recipe_dir)
    (recipe_dir / "data" / "chat.json").write_text(json.dumps([{"instruction": "hi", "output": "hello!"}]))
    after_text = _keys(recipe_dir)
    assert after_text[0] != base[0] and after_text[1] == base[1]
    (recipe_dir / "data" / "img" / "b.png").write_bytes(_png((0, 0, 255)))
    after_image = _keys(recipe_dir)
    assert after_image[1] != after_text[1] and after_image[0] == after_text[0]


@pytest.mark.parametrize("override", MIXING_KNOBS)
def test_mixing_knobs_keep_the_cache(recipe_dir: Path, override: str) -> None:
    assert _keys(recipe_dir, override) == _keys(recipe_dir)


def test_image_decode_policy_is_keyed() -> None:
    assert "exif" in cache_key.IMAGE_DECODE


def test_every_module_that_shapes_documents_is_in_the_code_hash() -> None:
    """The code the tokenize actors run on a record, listed here independently of CODE_PATHS."""
    package = Path(cache_key.__file__).resolve().parents[1]
    paths = [p for rel in CODE_PATHS for p in (package.glob(rel) if "*" in rel else [package / rel])]
    hashed = {f.resolve() for p in paths for f in (p.rglob("*.py") if p.is_dir() else [p])}
    shaping = [Renderer, PieceEncoder, get_family, pre_resize, to_conversations, iter_source, get_template, open_oriented,
               tcache.docs_to_table, type(get_family(load_recipe_model("llava"))),
               type(get_family(load_recipe_model("mllama")))]
    for obj in shaping:
        assert Path(inspect.getsourcefile(obj)).resolve() in hashed, obj
    worker = inspect.getsource(TokenizeWorker)  # what the actor calls: each of it is in the list above
    assert "pre_resize(" in worker and "render_batch(" in worker and "to_conversations(" in worker
    assert len(code_fingerprint()) == 64


def load_recipe_model(family: str):
    return Recipe.model_validate({"model": {"family": family}}).model


# ---------------------------------------------------------------- the real tokenize stage
def _tokenize(recipe_dir: Path, cache: Path, *overrides: str) -> list[SourceCache]:
    recipe = _recipe(recipe_dir, *overrides)
    return tokenize_sources(recipe, str(cache), workers=1, progress=False)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_real_tokenize_misses_on_document_knobs_and_hits_on_mixing_knobs(local_ray, recipe_dir: Path,
                                                                           tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = _tokenize(recipe_dir, cache)
    assert [c.hit for c in first] == [False, False]
    parts = {c.url: tcache.read_part(c.url, 0).to_pydict() for c in first}
    assert _tokenize(recipe_dir, cache, "mixture.ratio.text=0.5", "sources.chat.weight=3") == [
        SourceCache(c.url, c.fingerprint, c.n_parts, True) for c in first]
    for override in ("mixture.seq_len=16", "model.image_tokens=8", "shards.pre_resize=true"):
        again = _tokenize(recipe_dir, cache, override)
        assert all(not c.hit for c in again), override
        assert {c.url for c in again}.isdisjoint(parts), override
        for c in again:  # re-tokenized: new parts, with documents of their own
            assert tcache.read_complete(c.url) is not None
        docs = [tcache.read_part(c.url, 0).to_pydict() for c in again]
        assert docs != list(parts.values()), override
