"""Model families: image token, per-image costs against the real Mllama image processor, family_config."""
from __future__ import annotations

import io
import random

import numpy as np
import pytest
from PIL import Image as PILImage
from shardkit import image_bytes

from mlan.families.mllama.geometry import tile_grid
from mlan.families.registry import get_family
from mlan.families.tiny import tiny_llava_config, tiny_mllama_config
from mlan.mixture.tokenize import pre_resize
from mlan.recipe import ModelSpec
from mlan.render import Document, Renderer

CONFIG_KEYS = {"family", "vocab_size", "image_token_id", "image_tokens", "image_size", "patch_size", "tile_size", "max_tiles"}


def _sizes(n: int, seed: int, hi: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    edge = [(1, 1), (56, 56), (55, 57), (112, 56), (56, 224), (224, 224), (1000, 3), (3, 1000), (640, 480), (480, 640)]
    return edge + [(rng.randint(1, hi), rng.randint(1, hi)) for _ in range(n)]


def test_tiles_equal_mllama_image_processor_pil():
    """End to end: the real processor (tile 56, up to 4 tiles) on real PIL images of many sizes."""
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    family = get_family(ModelSpec(family="mllama", config="tiny"))
    processor = MllamaImageProcessorPil(size={"height": 56, "width": 56}, max_image_tiles=4)
    sizes = _sizes(60, seed=0, hi=400)
    images = [[PILImage.new("RGB", (w, h))] for w, h in sizes]
    got = processor(images)["num_tiles"]
    for (w, h), [n_tiles] in zip(sizes, got):
        assert family.tiles_for(w, h) == n_tiles, (w, h)
    assert len({family.tiles_for(w, h) for w, h in sizes}) >= 3  # the sizes exercise several tile counts


@pytest.mark.parametrize("max_tiles", [1, 2, 4, 6, 8])
@pytest.mark.parametrize("tile", [56, 560])
def test_tile_grid_equals_processor_canvas(max_tiles, tile):
    """The tile grid equals the processor's own canvas choice over many sizes and tile limits."""
    from transformers.models.mllama.image_processing_pil_mllama import get_optimal_tiled_canvas

    for w, h in _sizes(400, seed=max_tiles * tile, hi=tile * 5):
        canvas_h, canvas_w = get_optimal_tiled_canvas(h, w, max_tiles, tile)
        assert tile_grid(w, h, max_tiles, tile) == (canvas_h // tile, canvas_w // tile), (w, h)


def test_mllama_real_defaults_and_costs():
    family = get_family(ModelSpec(family="mllama", config="meta-llama/Llama-3.2-11B-Vision-Instruct"))
    assert family.image_seq_tokens() == 1
    assert family.image_token_id == 128256
    assert family.default_template == family.template == "llama3"
    assert family.tiles_for(560, 560) == 1 and family.tiles_for(1120, 560) == 2 and family.tiles_for(2000, 2000) == 4
    assert family.vision_tokens_for(560, 560) == 1601
    assert family.vision_tokens_for(1120, 1120) == 4 * 1601
    cfg = family.family_config()
    assert set(cfg) == CONFIG_KEYS
    assert cfg == {"family": "mllama", "vocab_size": 128256, "image_token_id": 128256, "image_tokens": 1,
                   "image_size": 560, "patch_size": 14, "tile_size": 560, "max_tiles": 4}
    small = get_family(ModelSpec(family="mllama", config="x/y", image_size=224, max_tiles=2))
    assert small.family_config()["tile_size"] == 224 and small.family_config()["max_tiles"] == 2
    assert small.tiles_for(1000, 1000) == 1 and small.tiles_for(1000, 500) == 2 and small.vision_tokens_for(224, 224) == 16 * 16 + 1


def test_llava_costs_and_config():
    real = get_family(ModelSpec(family="llava", config="meta-llama/Llama-3.2-3B"))
    assert real.image_seq_tokens() == 576 and real.vision_tokens_for(640, 480) == 576 and real.tiles_for(9, 9) == 1
    assert real.family_config() == {"family": "llava", "vocab_size": 128257, "image_token_id": 128256,
                                    "image_tokens": 576, "image_size": 336, "patch_size": 14, "tile_size": None,
                                    "max_tiles": 1}
    assert get_family(ModelSpec(family="llava", config="x", image_tokens=144)).image_seq_tokens() == 144
    assert get_family(ModelSpec(family="llava", config="x", image_size=224)).image_seq_tokens() == 256
    tiny = get_family(ModelSpec(family="llava", config="tiny"))
    assert tiny.family_config()["image_tokens"] == 16 and tiny.family_config()["image_size"] == 56
    assert tiny.family_config()["vocab_size"] == tiny_llava_config().text_config.vocab_size
    assert tiny.template == "llama3"
    assert get_family(ModelSpec(family="llava", template="vicuna_v1")).template == "vicuna_v1"


def test_geometry_read_from_a_local_model_config(tmp_path):
    """A config folder (a hub id works the same when cached) gives the image sizes and vocabulary."""
    llava = tiny_llava_config()
    llava.vision_config.image_size = 84
    llava.image_seq_length = 36
    llava.save_pretrained(tmp_path / "llava")
    cfg = get_family(ModelSpec(family="llava", config=str(tmp_path / "llava"))).family_config()
    assert (cfg["image_size"], cfg["patch_size"], cfg["image_tokens"], cfg["vocab_size"]) == (84, 14, 36, 128257)

    mllama = tiny_mllama_config()
    mllama.save_pretrained(tmp_path / "mllama")
    fam = get_family(ModelSpec(family="mllama", config=str(tmp_path / "mllama")))
    assert fam.family_config()["tile_size"] == 56 and fam.family_config()["vocab_size"] == 128256
    assert fam.vision_tokens_for(56, 56) == 17


def test_image_token_lookup_in_other_tokenizers(tmp_path):
    """A LLaVA-style tokenizer with `<image>` (and no `<|image|>`) gets that token's id."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "</s>": 1, "hello": 2, "<image>": 3}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>",
                                  additional_special_tokens=["<image>"])
    tok.save_pretrained(tmp_path / "tok")
    family = get_family(ModelSpec(family="llava", tokenizer=str(tmp_path / "tok"), config="x"))
    assert family.image_token == "<image>" and family.image_token_id == 3
    assert family.family_config()["vocab_size"] == 4

    vocab.pop("<image>")
    bare = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
                                   unk_token="<unk>")
    bare.save_pretrained(tmp_path / "bare")
    no_image = get_family(ModelSpec(family="llava", tokenizer=str(tmp_path / "bare"), config="x"))
    # a tokenizer with neither token gains `<|image|>` right after its vocabulary (mlan.tokenizer.with_image_token)
    assert no_image.image_token == "<|image|>" and no_image.image_token_id == len(vocab) == 3
    assert no_image.family_config()["vocab_size"] == 4
    assert no_image.tokenizer.convert_ids_to_tokens([0, 1, 2]) == ["<unk>", "</s>", "hello"]


@pytest.mark.parametrize("family, size, stored", [
    ("mllama", (300, 90), (56, 17)),  # one 56-px tile: fit inside it, aspect ratio kept
    ("mllama", (40, 30), (40, 30)),  # never upscaled
    ("llava", (300, 90), (56, 56)),  # the vision tower's square input
])
def test_pre_resize_asks_the_family_not_max_tiles(family, size, stored):
    """Defect: `pre_resize` took any build with max_tiles == 1 for LLaVA and squashed a one-tile Mllama's
    images to a square the loader then tiles differently."""
    spec = ModelSpec(family=family, config="tiny", max_tiles=1)
    renderer = Renderer(spec, 1024, "truncate")
    doc = Document("d", "s", "image_text", np.zeros(1, np.uint32), np.zeros(1, np.uint8),
                   images=[image_bytes(0, *size)], image_exts=["jpg"])
    assert pre_resize(doc, renderer).image_sizes == [stored]
    assert PILImage.open(io.BytesIO(doc.images[0])).size == stored
