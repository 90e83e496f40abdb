"""`mlan eval`: log-likelihood choice against an independent forward pass, batched greedy generation
against one-at-a-time decoding, answer extraction on real GSM8K answers and malformed generations,
forgetting Δ, and one-line errors for bad inputs."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch

from mlan.cli import main
from mlan.errors import UserError
from mlan.eval.answers import extract_answer, extract_gsm8k
from mlan.eval.forgetting import forgetting, harmonic_mean
from mlan.eval.harness import evaluate_tasks, load_model, model_inputs
from mlan.eval.prompts import prompt_ids
from mlan.eval.scoring import choice_loglikelihoods, generate
from mlan.eval.tasks import Item, infer_format, load_task
from mlan.recipe import ModelSpec
from mlan.render import Renderer
from mlan.sources.records import Conversation, Image, ImageRef, Message, Text


@pytest.fixture(scope="module")
def lm(tiny_llava_dir):
    return load_model(str(tiny_llava_dir))


@pytest.fixture(scope="module")
def colour_png(tmp_path_factory) -> str:
    from PIL import Image

    p = tmp_path_factory.mktemp("img") / "red.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (70, 90, 3), dtype=np.uint8)).save(p)
    return str(p)


def _reference_loglikelihood(model, prompt: list[int], option: list[int], pixel_values=None) -> float:
    """Independent: one unpadded forward of prompt+option; log p(token) = logit - logsumexp over the vocabulary."""
    ids = torch.tensor([prompt + option])
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=pixel_values).logits[0].double()
    total = 0.0
    for k, tok in enumerate(option):
        row = logits[len(prompt) - 1 + k]
        total += float(row[tok] - torch.logsumexp(row, dim=0))
    return total


def test_choice_loglikelihood_equals_independent_forward(lm, shared_data) -> None:
    task = load_task(shared_data / "eval" / "arc-challenge_test.json", limit=2, protocol="labels")
    item = task.items[0]
    prompt = prompt_ids(lm, item.prompt)
    # options of different lengths so the batch is padded
    texts = list(item.choices) + ["the correct answer is answer3", "no"]
    options = [lm.tokenizer.encode(t, add_special_tokens=False) for t in texts]
    assert len({len(o) for o in options}) > 1
    got = choice_loglikelihoods(lm, prompt, options, batch_size=4)
    want = [_reference_loglikelihood(lm.model, prompt, o) for o in options]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)


def test_choice_loglikelihood_with_image(lm, colour_png) -> None:
    from PIL import Image

    from mlan.families.llava.inputs import llava_pixel_values

    prompt = prompt_ids(lm, "What colour is this picture?", n_images=1)
    assert prompt.count(lm.geometry.image_token_id) == 16  # tiny LLaVA: 56 px / 14 px patches → 16 tokens
    options = [lm.tokenizer.encode(t, add_special_tokens=False) for t in ("red", "dark green", "blue")]
    got = choice_loglikelihoods(lm, prompt, options, image=colour_png, batch_size=2, inputs=model_inputs(lm))
    with Image.open(colour_png) as im:
        px = llava_pixel_values([im.convert("RGB")], lm.geometry.image_size)
    want = [_reference_loglikelihood(lm.model, prompt, o, pixel_values=px) for o in options]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)
    # the image matters: without it the scores differ
    blind = [_reference_loglikelihood(lm.model, prompt_ids(lm, "What colour is this picture?"), o) for o in options]
    assert not np.allclose(got, blind, atol=1e-3)


@pytest.mark.parametrize("n_images", [0, 1])
def test_eval_prompt_is_the_training_documents_prefix(lm, colour_png, n_images: int) -> None:
    """Eval's prompt == the build's document up to the trained answer, for the same user message; and both
    equal the tokenizer's own chat template with a generation prompt (each <|image|> widened to 16)."""
    question = "  What colour is this picture? "
    renderer = Renderer(ModelSpec(family="llava", tokenizer="llama3", config="tiny"), seq_len=4096)
    image = (Image(ImageRef(path=colour_png)),) * n_images
    user = Message("user", (*image, Text(("\n" if n_images else "") + question.strip())))
    doc = renderer.render(Conversation("t:0:0", "t", (user, Message("assistant", (Text("Red."),)))))
    start = int(np.flatnonzero(doc.loss_mask)[0])
    ids = prompt_ids(lm, question, n_images)
    assert ids == doc.input_ids[:start].tolist()
    tok = lm.tokenizer
    ref = tok.apply_chat_template([{"role": "user", "content": ("<|image|>\n" if n_images else "") + question.strip()}],
                                  tokenize=False, add_generation_prompt=True)
    ref_ids = tok.encode(ref, add_special_tokens=False)
    assert ids == [t for x in ref_ids for t in ([x] * 16 if x == lm.geometry.image_token_id else [x])]
    assert ids.count(lm.geometry.image_token_id) == 16 * n_images


def _greedy_one(model, prompt: list[int], n: int, stops: list[int]) -> list[int]:
    """Independent greedy decoding: full forward each step, no cache, no padding."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax())
            seq.append(nxt)
            if nxt in stops:
                break
    return seq[len(prompt):]


def test_batched_greedy_generation_equals_unbatched(lm) -> None:
    items = [Item(prompt="Hi", answer="x"), Item(prompt="What is the capital of France? Answer briefly.", answer="x"),
             Item(prompt="2+2=", answer="x")]
    texts = generate(lm, items, max_new_tokens=6)
    for item, text in zip(items, texts):
        ref = _greedy_one(lm.model, prompt_ids(lm, item.prompt), 6, lm.stop_ids)
        ref = [t for t in ref if t not in lm.stop_ids]
        assert text == lm.tokenizer.decode(ref, skip_special_tokens=True)


def test_generation_accuracy_is_pinned_to_independent_greedy_decode(lm, tmp_path) -> None:
    """A scorer that marks every generation wrong (or right) fails here."""
    questions = [f"Say something about item {i}." for i in range(6)]
    stops = lm.stop_ids
    decoded = [lm.tokenizer.decode([t for t in _greedy_one(lm.model, prompt_ids(lm, q), 5, stops) if t not in stops],
                                   skip_special_tokens=True) for q in questions]
    # gold = what the model says for the first four (normalisable text), a string it cannot say for the rest
    golds = [d if d.strip(" .") else "zzqx" for d in decoded[:4]] + ["zzqx never said", "qqzz never said"]
    expected = [bool(d.strip(" .")) for d in decoded[:4]] + [False, False]  # a generation equals its own text
    assert sum(expected) >= 3, f"the fixture needs non-empty generations; got {decoded}"
    f = tmp_path / "qa.jsonl"
    f.write_text("".join(json.dumps({"question": q, "answer": g}) + "\n" for q, g in zip(questions, golds)))
    res = evaluate_tasks(lm, [load_task(f)], batch_size=4, max_new_tokens=5, keep_records=True)["tasks"]["qa"]
    assert [r["generation"] for r in res["records"]] == decoded
    assert [r["correct"] for r in res["records"]] == expected
    assert res["accuracy"] == pytest.approx(100.0 * sum(expected) / 6)
    assert 0 < res["accuracy"] < 100


# ---------------------------------------------------------------- answer extraction
def test_gsm8k_extraction_on_real_answers(shared_data) -> None:
    lines = (shared_data / "eval" / "gsm8k_test.jsonl").read_text().splitlines()[:200]
    recs = [json.loads(line) for line in lines]
    for rec in recs:
        gold = rec["answer"].rsplit("####", 1)[1].strip().replace(",", "")
        assert extract_gsm8k(rec["answer"]) == gold
        rationale = rec["answer"].rsplit("####", 1)[0]
        # MLAN-style target and "The answer is N." both resolve to the gold number
        assert extract_gsm8k(f"{rationale} the direct answer is: {gold}") == gold
        assert extract_gsm8k(f"{rationale}\nThe answer is ${int(gold):,}.") == gold
    # without the marker the last number of the rationale is used: right for most real answers
    fallback = [extract_gsm8k(r["answer"].rsplit("####", 1)[0]) == r["answer"].rsplit("####", 1)[1].strip() for r in recs]
    assert 0.8 < sum(fallback) / len(fallback) < 1.0  # real rationales sometimes end on another number
    assert extract_gsm8k(recs[0]["answer"].rsplit("####", 1)[0]) == "18"  # "… $<<9*2=18>>18 every day …"


@pytest.mark.parametrize("text,want", [
    ("", None),
    ("I do not know.", None),
    ("#### ", None),
    ("so 4 + 5 = 9 ####", "9"),  # marker without a number: last number
    ("#### 18\n#### 20", "20"),  # repeated marker: the last one
    ("#### $1,234.00", "1234"),
    ("The temperature fell to -7 degrees. #### -7", "-7"),
    ("#### 2.50", "2.5"),
    ("The answer is: 42 apples", "42"),
    ("3 3 3 3 3 3 3 3 3 3 3 3 3 3", "3"),  # degenerate repetition
])
def test_gsm8k_extraction_on_malformed_generations(text, want) -> None:
    assert extract_gsm8k(text) == want


@pytest.mark.parametrize("text,gold,want", [
    ("Looking at the image, the direct answer is: Yes.", "no", "yes"),
    ("The man is tall. The direct answer is: no", "yes", "no"),
    ("False, because the box is grey.", "true", "false"),
    ("true true false", "false", "true"),
    ("the correct answer is answer3", "answer1", "answer3"),
    ("Answer 2", "answer1", "answer2"),
    ("nothing useful here", "answer1", None),
    ("maybe", "yes", None),
    ("", "true", None),
    ("The direct answer is: Red.\nExtra text", "blue", "red"),  # canonical option spelling
    ("It is blue, I think", "red", "blue"),
    ("the direct answer is: 7", "12", "7"),
])
def test_answer_extraction(text, gold, want) -> None:
    choices = ("red", "blue", "green") if gold in ("red", "blue") else ()
    assert extract_answer(text, gold, choices=choices) == want


# ---------------------------------------------------------------- formats
def test_formats_inferred_from_real_files(shared_data) -> None:
    ev = shared_data / "eval"
    arc = load_task(ev / "arc-easy_test.json", limit=5, protocol="labels")
    assert (arc.format, arc.kind, arc.group) == ("llm_adapters", "choice", "language")
    assert arc.items[0].choices == ("answer1", "answer2", "answer3", "answer4") and arc.items[0].answer == "answer1"
    boolq = load_task(ev / "boolq_test.json", limit=5, protocol="labels")
    assert boolq.items[0].choices == ("true", "false") and boolq.items[0].answer == "false"
    gsm = load_task(ev / "gsm8k_test.jsonl", limit=3)
    assert (gsm.format, gsm.kind, gsm.items[0].answer) == ("gsm8k", "generate", "18")
    nlvr = load_task(shared_data / "image_text" / "nlvr_dev" / "dev.json", limit=3)
    assert (nlvr.format, nlvr.kind, nlvr.group) == ("nlvr", "choice", "vision")
    assert Path(nlvr.items[0].image).name == "dev-1572-0-0.png" and Path(nlvr.items[0].image).is_file()
    assert infer_format({"question_stem": "q", "choices": {"text": ["a"], "label": ["A"]}, "answerKey": "A"}) == "hf_mc"


def test_common_jsonl_forms(tmp_path, colour_png) -> None:
    mc = tmp_path / "mc.jsonl"
    mc.write_text("\n".join(json.dumps(r) for r in [
        {"question": "q1", "choices": ["a", "b", "c"], "answer": 2},
        {"question": "q2", "choices": ["a", "b"], "answer": "B"},
        {"question": "q3", "choices": ["x", "y"], "answer": "x", "image": colour_png},
    ]))
    t = load_task(mc, images=str(Path(colour_png).parent), protocol="labels")  # an absolute image path must lie inside the root
    assert [i.answer for i in t.items] == ["c", "b", "x"] and t.group == "vision"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "choices": ["a"], "answer": 5}) + "\n")
    with pytest.raises(UserError, match=r"bad.jsonl: record 0: field 'answer'"):
        load_task(bad)


# ---------------------------------------------------------------- forgetting
def test_harmonic_mean_and_delta() -> None:
    assert harmonic_mean([50.0, 25.0, 80.0]) == pytest.approx(statistics.harmonic_mean([50.0, 25.0, 80.0]))
    assert harmonic_mean([0.0, 90.0]) == 0.0
    ref = {"tasks": {"a": {"accuracy": 60.0, "group": "language"}, "b": {"accuracy": 40.0, "group": "language"},
                     "v": {"accuracy": 70.0, "group": "vision"}, "only_ref": {"accuracy": 1.0, "group": "language"}}}
    now = {"tasks": {"a": {"accuracy": 30.0, "group": "language"}, "b": {"accuracy": 40.0, "group": "language"},
                     "v": {"accuracy": 75.0, "group": "vision"}}}
    f = forgetting(ref, now)["groups"]
    assert f["language"]["delta"] == pytest.approx(statistics.harmonic_mean([60, 40]) - statistics.harmonic_mean([30, 40]))
    assert f["language"]["tasks"] == ["a", "b"]  # only shared tasks
    assert f["vision"]["delta"] == pytest.approx(-5.0)  # negative: the model improved
    with pytest.raises(UserError, match="shares no task"):
        forgetting({"tasks": {"z": {"accuracy": 1.0, "group": "language"}}}, now)


# ---------------------------------------------------------------- the command
def test_eval_command_on_real_tasks(tiny_llava_dir, shared_data, tmp_path, capsys) -> None:
    ev = shared_data / "eval"
    out = tmp_path / "res.json"
    args = [str(tiny_llava_dir), "--tasks", f"arc={ev / 'arc-challenge_test.json'}", str(ev / "boolq_test.json"),
            f"gsm8k={ev / 'gsm8k_test.jsonl'}", f"nlvr={shared_data / 'image_text' / 'nlvr_dev' / 'dev.json'}",
            "--limit", "3", "--max-new-tokens", "4", "--batch-size", "4", "--out", str(out)]
    assert main(["eval", *args]) == 0
    res = json.loads(out.read_text())
    assert set(res["tasks"]) == {"arc", "boolq_test", "gsm8k", "nlvr"}
    for t in res["tasks"].values():
        assert t["n"] == 3 and 0 <= t["accuracy"] <= 100
        assert t["accuracy"] * 3 / 100 == pytest.approx(round(t["accuracy"] * 3 / 100))  # k of 3 correct
    lang = [res["tasks"][n]["accuracy"] for n in ("arc", "boolq_test", "gsm8k")]
    assert res["language_avg"] == pytest.approx(sum(lang) / 3)
    assert res["vision_avg"] == pytest.approx(res["tasks"]["nlvr"]["accuracy"])
    assert "language (pooled)" in capsys.readouterr().out

    # forgetting against a reference results file (here: a made-up better reference)
    ref = tmp_path / "ref.json"
    ref.write_text(json.dumps({"tasks": {"arc": {"accuracy": 100.0, "group": "language"},
                                         "nlvr": {"accuracy": 100.0, "group": "vision"}}}))
    out2 = tmp_path / "res2.json"
    assert main(["eval", str(tiny_llava_dir), "--tasks", f"arc={ev / 'arc-challenge_test.json'}", "--limit", "3",
                 "--reference", str(ref), "--out", str(out2)]) == 0
    res2 = json.loads(out2.read_text())
    assert res2["forgetting"]["groups"]["language"]["delta"] == pytest.approx(
        100.0 - harmonic_mean([res2["tasks"]["arc"]["accuracy"]]) if res2["tasks"]["arc"]["accuracy"] else 100.0)


def test_eval_errors_are_one_line(tmp_path, tiny_llava_dir, shared_data, capsys) -> None:
    not_model = tmp_path / "not_a_model"
    not_model.mkdir()
    (not_model / "weights.txt").write_text("x")
    task = shared_data / "eval" / "boolq_test.json"
    assert main(["eval", str(not_model), "--tasks", str(task)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(not_model) in err and "not a model directory" in err

    unknown = tmp_path / "weird.jsonl"
    unknown.write_text(json.dumps({"prompt": "p", "target": "t"}) + "\n")
    assert main(["eval", str(tiny_llava_dir), "--tasks", str(unknown)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(unknown) in err and "unknown task format" in err

    assert main(["eval", str(tiny_llava_dir), "--tasks", str(tmp_path / "missing.json")]) == 2
    assert "missing.json" in capsys.readouterr().err


def test_choice_accuracy_is_argmax_of_independent_loglikelihoods(lm, tmp_path) -> None:
    f = tmp_path / "mc.jsonl"
    recs = [{"question": f"Pick one {i}", "choices": ["alpha", "beta", "gamma delta"], "answer": i % 3} for i in range(4)]
    f.write_text("\n".join(json.dumps(r) for r in recs))
    res = evaluate_tasks(lm, [load_task(f, protocol="labels")], batch_size=2, keep_records=True)
    t = res["tasks"]["mc"]
    want = 0
    for rec, r in zip(recs, t["records"]):
        prompt = prompt_ids(lm, rec["question"])
        lls = [_reference_loglikelihood(lm.model, prompt, lm.tokenizer.encode(c, add_special_tokens=False))
               for c in rec["choices"]]
        want += int(np.argmax(lls) == rec["answer"])
        assert r["prediction"] == rec["choices"][int(np.argmax(lls))]
    assert t["accuracy"] == pytest.approx(100.0 * want / len(recs))


def test_recipe_task_spec_overrides_kind_and_group(lm, shared_data) -> None:
    from mlan.eval.harness import _as_task
    from mlan.recipe import EvalTaskSpec

    spec = EvalTaskSpec(name="boolq_gen", path=str(shared_data / "eval" / "boolq_test.json"), kind="generate",
                        group="vision", limit=2)
    task = _as_task(spec, limit=None, images=None)
    assert (task.name, task.kind, task.group, len(task.items)) == ("boolq_gen", "generate", "vision", 2)
    res = evaluate_tasks(lm, [task], batch_size=2, max_new_tokens=3, keep_records=True)
    recs = res["tasks"]["boolq_gen"]["records"]
    assert all("generation" in r for r in recs) and res["vision_avg"] == res["tasks"]["boolq_gen"]["accuracy"]
    assert res["language_avg"] is None


def test_mllama_choice_with_image_equals_processor_built_forward(tmp_path, colour_png) -> None:
    """Mllama: one <|image|> token, tiles, and a cross-attention mask; the reference builds its inputs with
    transformers' own Mllama helpers (image processor + sparse→dense cross-attention mask)."""
    from PIL import Image
    from transformers import MllamaForConditionalGeneration
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil
    from transformers.models.mllama.processing_mllama import (
        convert_sparse_cross_attention_mask_to_dense,
        get_cross_attention_token_mask,
    )

    from mlan.families.tiny import tiny_mllama_config
    from mlan.tokenizer import load_tokenizer

    torch.manual_seed(0)
    MllamaForConditionalGeneration(tiny_mllama_config(num_layers=5)).save_pretrained(tmp_path)
    load_tokenizer("llama3").save_pretrained(tmp_path)
    mm = load_model(str(tmp_path))
    assert mm.family == "mllama"
    prompt = prompt_ids(mm, "What colour is this picture?", n_images=1)
    assert prompt.count(128256) == 1
    options = [mm.tokenizer.encode(t, add_special_tokens=False) for t in ("red", "light blue")]
    got = choice_loglikelihoods(mm, prompt, options, image=colour_png, batch_size=2, inputs=model_inputs(mm))

    side = mm.geometry.image_size
    proc = MllamaImageProcessorPil(size={"height": side, "width": side}, max_image_tiles=mm.geometry.max_tiles)
    with Image.open(colour_png) as im:
        px = proc(images=[[im.convert("RGB")]], return_tensors="pt")
    want = []
    for o in options:
        ids = prompt + o
        sparse = [get_cross_attention_token_mask(ids, 128256)]
        cross = torch.tensor(convert_sparse_cross_attention_mask_to_dense(
            sparse, px["num_tiles"], mm.geometry.max_tiles, len(ids)))
        with torch.no_grad():
            logits = mm.model(input_ids=torch.tensor([ids]), pixel_values=px["pixel_values"],
                              aspect_ratio_ids=px["aspect_ratio_ids"], aspect_ratio_mask=px["aspect_ratio_mask"],
                              cross_attention_mask=cross, use_cache=False).logits[0].double()
        want.append(sum(float(logits[len(prompt) - 1 + k, t] - torch.logsumexp(logits[len(prompt) - 1 + k], 0))
                        for k, t in enumerate(o)))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)
