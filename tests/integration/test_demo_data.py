"""The demo's generated data: deterministic, read by mlan's own sources and renderer, eval prompts equal to
the training rendering's prompt, labels that the pixels and the word lists really carry, and the demo recipe."""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mlan.demo import prepare_demo, trend
from mlan.eval.tasks import load_task
from mlan.recipe import load_recipe
from mlan.synthetic import CATEGORIES, COLOURS, generate_demo_data, word_facts


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    prepare_demo(out)
    return out


def test_generation_is_deterministic(tmp_path) -> None:
    a = generate_demo_data(tmp_path / "a", n_text=50, n_image=20, n_eval_vision=16, seed=3)
    generate_demo_data(tmp_path / "b", n_text=50, n_image=20, n_eval_vision=16, seed=3)
    generate_demo_data(tmp_path / "c", n_text=50, n_image=20, n_eval_vision=16, seed=4)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")
    assert len(a.text.read_text().splitlines()) == 50
    assert len(json.loads(a.image_text.read_text())) == 20


def test_labels_are_what_the_data_carries(demo) -> None:
    """Independent checks: each image's mean pixel is nearest its named colour; each word is in its category."""
    names = list(COLOURS)
    ref = np.array([COLOURS[n] for n in names], dtype=float)
    records = json.loads((demo / "data" / "image_text.json").read_text())
    for rec in records[:60]:
        with Image.open(demo / "data" / "images" / rec["image"]) as im:
            assert im.size == (56, 56)
            mean = np.asarray(im.convert("RGB"), dtype=float).reshape(-1, 3).mean(0)
        assert names[int(np.argmin(((ref - mean) ** 2).sum(1)))] == rec["conversations"][1]["value"]
    for line in (demo / "data" / "text.jsonl").read_text().splitlines()[:200]:
        rec = json.loads(line)
        vocabulary = {w for words in CATEGORIES.values() for w in words}
        found = [w for w in rec["instruction"].rstrip("?.").split() if w in vocabulary]
        assert len(found) == 1 and found[0] in CATEGORIES[rec["output"]]


def test_eval_files_are_balanced_four_way_choices(demo) -> None:
    lang = load_task(demo / "data" / "eval_language.jsonl")
    vis = load_task(demo / "data" / "eval_vision.jsonl")
    assert (lang.kind, lang.group, vis.kind, vis.group) == ("choice", "language", "choice", "vision")
    assert len(lang.items) == len(word_facts()) == 48  # 12 words in each of 4 groups
    for task in (lang, vis):
        assert all(len(it.choices) == 4 and it.answer in it.choices for it in task.items)
    assert set(Counter(it.answer for it in lang.items).values()) == {12}
    assert set(Counter(it.answer for it in vis.items).values()) == {10}  # 80 items over 8 colours
    assert all(Path(it.image).is_file() for it in vis.items)
    # eval images are new pictures, not copies of training images
    train = {hashlib.sha256(p.read_bytes()).hexdigest() for p in (demo / "data" / "images" / "train").glob("*.png")}
    assert not train & {hashlib.sha256(Path(it.image).read_bytes()).hexdigest() for it in vis.items}


def test_sources_render_and_eval_prompt_equals_training_prompt(demo) -> None:
    """The demo recipe's sources go through mlan's readers and renderer; the tokens before the trained answer
    are exactly what `mlan eval` feeds the model, so log-likelihood choice scores what training taught."""
    from mlan.eval.prompts import PromptRenderer
    from mlan.render import Renderer
    from mlan.sources.readers import iter_conversations

    recipe = load_recipe(demo / "demo.yaml")
    renderer = Renderer(recipe.model, recipe.mixture.seq_len)
    prompts = PromptRenderer(renderer.tokenizer, image_token_id=128256, image_tokens=recipe.model.image_tokens)
    for source in recipe.sources:
        convs = [c for c, _ in zip(iter_conversations(source), range(20))]
        assert not [c for c in convs if isinstance(c, Exception)]
        for conv in convs:
            doc = renderer.render(conv)
            start = int(np.flatnonzero(doc.loss_mask)[0])
            user = conv.messages[0].text.strip()
            n_images = len(conv.images)
            assert doc.input_ids[:start].tolist() == prompts.ids(user, n_images)
            answer = renderer.tokenizer.decode(doc.input_ids[start:].tolist(), skip_special_tokens=True)
            assert answer == conv.messages[1].text
            assert doc.n_tokens <= recipe.mixture.seq_len
            if source.modality == "image_text":
                assert doc.n_image_tokens == 16 and n_images == 1


def test_demo_recipe_points_at_generated_files(demo) -> None:
    recipe = load_recipe(demo / "demo.yaml")
    assert recipe.model.family == "llava" and recipe.model.config == "tiny"
    for s in recipe.sources:
        assert Path(s.path).is_file()
    assert {t.group for t in recipe.eval.tasks} == {"language", "vision"}
    assert all(Path(t.path).is_file() for t in recipe.eval.tasks)
    prepare_demo(demo)  # a second call keeps the data (the ablation's cache stays valid)
    assert (demo / "data" / "eval_vision.jsonl").is_file()


def test_trend() -> None:
    rows = [{"text_ratio": 1.0, "language_avg": 90.0, "vision_avg": 20.0},
            {"text_ratio": 0.0, "language_avg": 25.0, "vision_avg": 95.0}]
    assert trend(rows) == (True, True)
    rows[0]["vision_avg"] = 99.0
    assert trend(rows) == (True, False)
