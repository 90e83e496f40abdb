"""A third family is one folder (issue #24 item 2): `tests/families/qwen2_llava/`, LLaVA on a Qwen2 decoder,
plugged in through `MLAN_FAMILY_MODULES` without a line of mlan changed, is found by the shared code through
its family's anatomy, and builds, trains, exports and evaluates through the CLI (Ray's workers and torchrun's
workers find it through the inherited environment)."""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mlan.families import registry

REPO = Path(__file__).resolve().parents[2]
MODULE = "tests.families.qwen2_llava"


def plugin_env(**extra: str) -> dict[str, str]:
    """The environment of a CLI run with the test family plugged in (the repository importable as a root)."""
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MLAN_FAMILY_MODULES": MODULE, **extra}


def mlan(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mlan.cli", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, check=False)


@pytest.fixture
def plugged_in(monkeypatch):
    """The registry with the test family registered in this process (as MLAN_FAMILY_MODULES does); restored after."""
    monkeypatch.setattr(registry, "_FAMILIES", dict(registry._FAMILIES))
    if MODULE in sys.modules:  # imported by an earlier test: register again into this copy
        importlib.reload(sys.modules[MODULE])
    else:
        monkeypatch.syspath_prepend(str(REPO))
        importlib.import_module(MODULE)
    return registry.family_plugin("qwen2-llava")


def test_shared_code_finds_the_plug_in_familys_parts(plugged_in, tmp_path) -> None:
    """Build through mlan's model builder, then every shared consumer of a model's anatomy: FSDP blocks, freeze
    groups, the loss vocabulary, attention switching, the lm-eval text model, and the family read back from the
    saved config (model_type alone says "llava")."""
    from transformers import AutoConfig
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

    from mlan.eval.lm_eval_bridge import language_model as lm_eval_model
    from mlan.families import modeling
    from mlan.recipe import parse_recipe
    from mlan.train.attention import DOCUMENTS_IMPLEMENTATION, set_attention
    from mlan.train.parallel import transformer_blocks

    recipe = parse_recipe({"model": {"family": "qwen2-llava", "config": "tiny"}})
    fc = registry.get_family(recipe.model).family_config()
    assert (fc["family"], fc["image_tokens"], fc["image_size"]) == ("qwen2-llava", 4, 28)
    torch.manual_seed(0)
    model = modeling.build_model(recipe.model, fc)
    assert model.config.mlan_family == "qwen2-llava" and model.config.model_type == "llava"
    blocks = transformer_blocks(model)
    assert [type(b).__name__ for b in blocks] == ["Qwen2DecoderLayer"] * 2 + ["CLIPEncoderLayer"] * 2
    groups = modeling.module_groups(model)
    assert groups["cross_attention"] == [] and groups["projector"] == [model.model.multi_modal_projector]
    assert all(isinstance(layer, Qwen2DecoderLayer) for layer in groups["language_model"][0].layers)
    assert modeling.real_vocab_size(model) == fc["image_token_id"]  # the image token's row is no class
    set_attention(model, "documents")
    assert model.model.language_model.config._attn_implementation == DOCUMENTS_IMPLEMENTATION

    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["mlan_family"] == "qwen2-llava"
    assert registry.family_for_config(AutoConfig.from_pretrained(tmp_path)) is plugged_in
    assert registry.family_for_model_type("llava").name == "llava"  # the built-in keeps plain LLaVA checkpoints

    text_lm = lm_eval_model(model.eval(), str(tmp_path))
    assert type(text_lm).__name__ == "Qwen2ForCausalLM"
    ids = torch.tensor([[1, 50, 60, 70]])
    with torch.no_grad():
        torch.testing.assert_close(text_lm(input_ids=ids).logits, model(input_ids=ids).logits)


def test_a_checkpoint_naming_an_unregistered_family_is_one_error(tmp_path) -> None:
    with pytest.raises(registry.FamilyLookupError, match="'qwen2-llava' is not a registered family"):
        registry.family_for_config({"model_type": "llava", "mlan_family": "qwen2-llava"})


def test_an_unimportable_family_module_is_one_line(tmp_path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model: {family: llava, config: tiny}\n")
    res = mlan("build", str(recipe), "--out", str(tmp_path / "out"),
               env=plugin_env(MLAN_FAMILY_MODULES="no_such_family_module"), timeout=120)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert len(lines) == 1 and "MLAN_FAMILY_MODULES" in lines[0] and "no_such_family_module" in lines[0], lines


RECIPE = """
model: {family: qwen2-llava, tokenizer: llama3, config: tiny}
sources:
  - name: alpaca
    path: DATA/text/alpaca_en_demo.json
    format: alpaca
    modality: text
  - name: nlvr
    path: DATA/image_text/nlvr_dev/dev.json
    format: template
    modality: image_text
    images: DATA/image_text/nlvr_dev
    template:
      prompts: ["<image>\\nTrue or false: {sentence}"]
      response: "{label}"
      image: "images/{directory}/dev-{identifier}-0.png"
mixture:
  budget: {tokens: 3000}
  ratio: {text: 0.5, by: tokens}
  seq_len: 256
  seed: 1
shards: {target_tokens: 1500}
train: {lr: 3.0e-3, warmup_ratio: 0.1, batch_rows: 1, grad_accum: 1, loader_workers: 0, budget_tokens: 600}
"""


@pytest.mark.slow  # a Ray build, a torchrun training run and an eval, each a CLI process (≈ 1 min on 2 cores)
@pytest.mark.timeout(600)
def test_third_family_builds_trains_exports_and_evaluates_through_the_cli(shared_data, tmp_path) -> None:
    env = plugin_env()
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.replace("DATA", str(shared_data)))
    build, run = tmp_path / "build", tmp_path / "run"
    res = mlan("build", str(recipe), "--out", str(build), "--workers", "1", "--cache", str(tmp_path / "cache"),
               env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    family_config = json.loads((build / "manifest.json").read_text())["family_config"]
    assert (family_config["family"], family_config["image_tokens"]) == ("qwen2-llava", 4)

    res = mlan("train", str(recipe), "--shards", str(build), "--out", str(run), env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    config = json.loads((run / "final" / "config.json").read_text())
    assert (config["mlan_family"], config["text_config"]["model_type"]) == ("qwen2-llava", "qwen2")

    results = tmp_path / "eval.json"
    res = mlan("eval", str(run / "final"), "--tasks", f"arc={shared_data / 'eval' / 'arc-easy_test.json'}",
               f"nlvr={shared_data / 'image_text' / 'nlvr_dev' / 'dev.json'}", "--limit", "2",
               "--max-new-tokens", "2", "--out", str(results), env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    tasks = json.loads(results.read_text())["tasks"]
    assert {name: t["n"] for name, t in tasks.items()} == {"arc": 2, "nlvr": 2}
    # eval finds the family by the export's mlan_family, not by its model_type ("llava"): unplugged, one line
    unplugged = {k: v for k, v in env.items() if k != "MLAN_FAMILY_MODULES"}
    res = mlan("eval", str(run / "final"), "--tasks", str(shared_data / "eval" / "arc-easy_test.json"), "--limit",
               "1", env=unplugged)
    assert res.returncode == 2 and "mlan_family 'qwen2-llava' is not a registered family" in res.stderr, res.stderr
