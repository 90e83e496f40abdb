"""`lm-eval:NAME` through lm-evaluation-harness 0.4.13 itself, offline: a local JSON task YAML, a tiny real
Llama and a tiny LLaVA saved with the offline Llama-3 tokenizer."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mlan.errors import UserError
from mlan.eval.stats import chance_level, wilson_ci

pytest.importorskip("lm_eval")
from mlan.eval.lm_eval_bridge import run_lm_eval_task

QUESTIONS = [("What colour is the sky?", ["blue", "green", "red"], 0),
             ("Which animal barks?", ["a cat", "a dog", "a fish", "a bird"], 1),
             ("What is two plus two?", ["four", "three", "five"], 0),
             ("Which is a fruit?", ["a chair", "a stone", "an apple", "a shoe"], 2),
             ("What do bees make?", ["milk", "honey"], 1)]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny LLaVA and a Llama folder holding exactly its language model (same weights, same tokenizer)."""
    from transformers import LlamaForCausalLM, LlavaForConditionalGeneration

    from mlan.families.tiny import tiny_llava_config
    from mlan.tokenizer import load_tokenizer

    root = tmp_path_factory.mktemp("lm_eval_models")
    tok = load_tokenizer("llama3")
    torch.manual_seed(0)
    vlm = LlavaForConditionalGeneration(tiny_llava_config())
    vlm.save_pretrained(root / "llava")
    tok.save_pretrained(root / "llava")
    llama = LlamaForCausalLM(vlm.config.text_config)
    state = {f"model.{k}": v for k, v in vlm.model.language_model.state_dict().items()}
    state["lm_head.weight"] = vlm.lm_head.weight
    llama.load_state_dict(state)
    llama.save_pretrained(root / "llama")
    tok.save_pretrained(root / "llama")
    return root / "llama", root / "llava"


@pytest.fixture(scope="module")
def task_yaml(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lm_eval_task")
    data = root / "items.jsonl"
    data.write_text("".join(json.dumps({"id": f"q{i}", "question": q, "choices": c, "label": g}) + "\n"
                            for i, (q, c, g) in enumerate(QUESTIONS)))
    yaml = root / "tiny_qa.yaml"
    yaml.write_text(f"""task: tiny_qa
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{label}}}}"
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
""")
    return yaml


def _reference_loglik(model, tok, context: str, continuation: str) -> float:
    """One unpadded forward of context + continuation split as lm-eval 0.4.13 splits it (the tokenizer's own
    special tokens: Llama-3's BOS)."""
    whole = tok.encode(context + continuation)
    ctx = tok.encode(context)
    cont = whole[len(ctx):]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([whole])).logits[0].double(), dim=-1)
    return float(sum(logp[len(ctx) - 1 + k, t] for k, t in enumerate(cont)))


@pytest.mark.slow  # ≈ 25 s on a quiet 2-core machine: the fixture's models plus one harness run
def test_entry_and_records_follow_the_contract(models, task_yaml) -> None:
    from transformers import AutoTokenizer, LlamaForCausalLM

    llama_dir, _ = models
    entry, records = run_lm_eval_task(str(llama_dir), str(task_yaml), limit=None, batch_size=4)
    assert entry["protocol"] == "lm-eval" and entry["n"] == len(QUESTIONS) == len(records)
    assert [r["id"] for r in records] == [f"q{i}" for i in range(len(QUESTIONS))]
    right = sum(r["correct"] for r in records)
    assert entry["accuracy"] == entry["acc"]["value"] == pytest.approx(100 * right / len(records))
    assert entry["ci95"] == pytest.approx(list(wilson_ci(right, len(records))))
    assert entry["accuracy"] == pytest.approx(100 * entry["lm_eval"]["results"]["acc,none"])
    assert entry["acc_norm"]["value"] == pytest.approx(100 * entry["lm_eval"]["results"]["acc_norm,none"])
    assert entry["chance"] == pytest.approx(chance_level([len(c) for _, c, _ in QUESTIONS]))
    model = LlamaForCausalLM.from_pretrained(llama_dir).eval()
    tok = AutoTokenizer.from_pretrained(llama_dir)
    for rec, (question, choices, gold) in zip(records, QUESTIONS):
        assert rec["gold"] == choices[gold]
        want = [_reference_loglik(model, tok, f"Question: {question}\nAnswer:", " " + c) for c in choices]
        assert rec["loglik"] == pytest.approx(want, abs=1e-3)
        assert rec["prediction"] == choices[max(range(len(want)), key=want.__getitem__)]
        assert rec["correct"] == (rec["prediction"] == rec["gold"])
        norm = [w / len(c) for w, c in zip(want, choices)]
        assert rec["correct_norm"] == (max(range(len(norm)), key=norm.__getitem__) == gold)


@pytest.mark.slow  # a second and third harness run (≈ 12 s)
def test_llava_is_scored_through_its_language_model(models, task_yaml) -> None:
    llama_dir, llava_dir = models
    _, text_only = run_lm_eval_task(str(llama_dir), str(task_yaml), limit=3, batch_size=2)
    entry, from_vlm = run_lm_eval_task(str(llava_dir), str(task_yaml), limit=3, batch_size=2)
    assert entry["n"] == 3  # --limit takes the first N items
    for a, b in zip(text_only, from_vlm):
        assert a["id"] == b["id"] and a["prediction"] == b["prediction"]
        assert a["loglik"] == pytest.approx(b["loglik"], abs=1e-4)


def test_bad_specs_are_one_line_errors(tmp_path) -> None:
    llama_dir = tmp_path / "model"  # both are refused before any model is loaded
    with pytest.raises(UserError, match="task YAML not found"):
        run_lm_eval_task(str(llama_dir), str(tmp_path / "missing.yaml"), limit=None, batch_size=2)
    with pytest.raises(UserError, match="n = 0"):
        run_lm_eval_task(str(llama_dir), "tiny_qa", limit=0, batch_size=2)


def test_language_model_of_llava_and_mllama_gives_the_vlms_text_logits() -> None:
    """The causal LM handed to lm-eval shares the VLM's decoder and head: same logits on a text-only input."""
    from transformers import LlavaForConditionalGeneration, MllamaForConditionalGeneration

    from mlan.eval.lm_eval_bridge import language_model
    from mlan.families.tiny import tiny_llava_config, tiny_mllama_config

    torch.manual_seed(0)
    for vlm in (LlavaForConditionalGeneration(tiny_llava_config()).eval(),
                MllamaForConditionalGeneration(tiny_mllama_config(num_layers=5)).eval()):
        lm = language_model(vlm, "tiny")
        assert type(lm).__name__.endswith("ForCausalLM")
        ids = torch.tensor([[1, 50, 60, 70]])
        with torch.no_grad():
            torch.testing.assert_close(lm(input_ids=ids).logits, vlm(input_ids=ids).logits)


@pytest.mark.slow  # one harness run and one mlan scoring of 3 items (≈ 10 s)
def test_mlan_eval_runs_lm_eval_tasks_beside_its_own(models, task_yaml, shared_data, tmp_path, capsys) -> None:
    """`mlan eval --tasks lm-eval:YAML FILE`: the harness's task and mlan's own in one results file and one
    per-item file, pooled in the language group."""
    from mlan.cli import main

    llama_dir, _ = models
    out = tmp_path / "eval.json"
    arc = shared_data / "eval" / "arc-easy_test.json"
    assert main(["eval", str(llama_dir), "--tasks", f"lm-eval:{task_yaml}", f"arc={arc}", "--limit", "3",
                 "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert set(results["tasks"]) == {"tiny_qa", "arc"}
    assert results["tasks"]["tiny_qa"]["protocol"] == "lm-eval" and results["tasks"]["tiny_qa"]["n"] == 3
    lines = [json.loads(line) for line in out.with_name("eval.items.jsonl").read_text().splitlines()]
    assert sorted({r["task"] for r in lines}) == ["arc", "tiny_qa"] and len(lines) == 6
    pooled = results["groups"]["language"]
    assert pooled["n"] == 6 and pooled["accuracy"] == pytest.approx(100 * sum(r["correct"] for r in lines) / 6)
    assert "tiny_qa" in capsys.readouterr().out  # the table lists it
