"""Warnings that save runs (issue #23 item 3): one line each for probable recipe mistakes, none for the shipped
recipes."""
from __future__ import annotations

import io
import json

import numpy as np

from mlan import progress
from mlan.mixture.plan import Plan, SourcePlan
from mlan.mixture.plan_warnings import plan_warnings, recipe_warnings
from mlan.recipe import load_recipe

RECIPE = """
model: {{family: llava, config: tiny}}
sources:
  - {{name: pics, path: {data}, format: llava, modality: image_text{images}}}
  - {{name: words, path: {words}, format: alpaca, modality: text}}
mixture: {{budget: {{tokens: 1000}}, ratio: {{text: 0.5}}, seq_len: 256}}
"""


def _recipe(tmp_path, images: str = ""):
    (tmp_path / "img").mkdir(exist_ok=True)
    (tmp_path / "img" / "a.png").write_bytes(b"")
    record = {"id": "1", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                             {"from": "gpt", "value": "A thing."}]}
    (tmp_path / "pics.json").write_text(json.dumps([record]))
    (tmp_path / "words.json").write_text(json.dumps([{"instruction": "Say hi", "input": "", "output": "hi"}]))
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE.format(data=tmp_path / "pics.json", words=tmp_path / "words.json", images=images))
    return load_recipe(path)


def test_relative_image_paths_without_a_root_that_are_not_found(tmp_path):
    lines = recipe_warnings(_recipe(tmp_path))
    assert len(lines) == 1 and "source 'pics'" in lines[0] and "'a.png'" in lines[0]
    assert "sources.pics.images" in lines[0]
    assert recipe_warnings(_recipe(tmp_path, f", images: {tmp_path / 'img'}")) == []  # a root: no warning
    (tmp_path / "a.png").write_bytes(b"")  # found beside the source file: resolves, no warning
    assert recipe_warnings(_recipe(tmp_path)) == []


def test_long_documents_and_many_repeats(tmp_path):
    recipe = _recipe(tmp_path, f", images: {tmp_path / 'img'}")
    summaries = {"pics": {"accepted": 10, "dropped": 0, "truncated": 8},
                 "words": {"accepted": 10, "dropped": 0, "truncated": 1}}
    plan = Plan(np.zeros(0, np.int32), np.zeros(0, np.int64), np.zeros(0, np.int64), sources=(
        SourcePlan("pics", "image_text", available_docs=10, available_tokens=100, target=500, docs=12, tokens=500,
                   repeats=1, sampled=2),
        SourcePlan("words", "text", available_docs=10, available_tokens=100, target=500, docs=50, tokens=500,
                   repeats=5, sampled=0)))
    lines = plan_warnings(recipe, plan, summaries)
    assert len(lines) == 2
    assert lines[0].startswith("source 'pics': 80% of its documents are longer than mixture.seq_len = 256")
    assert lines[1].startswith("source 'words': the budget uses its 10 text documents 5.0 times over")


def test_warnings_are_one_line_each_and_quiet_hides_them():
    out = io.StringIO()
    progress.warn("x is off", settings=progress.LogSettings(), stream=out)
    progress.warn("x is off", settings=progress.LogSettings(quiet=True), stream=out)
    assert out.getvalue() == "warning: x is off\n"


def test_shipped_recipes_have_no_warning(repo_root, shared_data):
    for name in ("tiny-llava", "tiny-mllama", "shared-data"):
        assert recipe_warnings(load_recipe(repo_root / "recipes" / f"{name}.yaml")) == [], name
