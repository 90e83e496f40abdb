"""Scoring protocols: LLM-Adapters records parsed into question and options, the lm-eval protocol equal to
lm-evaluation-harness itself per item (prediction, acc_norm prediction, log-likelihoods within 1e-3), the score
contract and its per-item file, item selection (--limit, --items) and n = 0 refused in one line."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from mlan.cli import main
from mlan.errors import UserError
from mlan.eval.harness import evaluate, evaluate_tasks, items_path, load_model, write_results
from mlan.eval.protocols import lm_eval_doc, paper_answer, paper_prompt, parse_adapters
from mlan.eval.stats import wilson_ci
from mlan.eval.tasks import load_task

FILES = ("arc-easy", "arc-challenge", "openbookqa", "piqa", "winogrande", "boolq")

# an unseen choice file in the LLM-Adapters rendering: other words around the question, `ChoiceK` labels
GENERIC = [
    {"instruction": "Please pick the best ending for the text: The cat sat on the\n\nChoice1: mat Choice2: "
     "moon Choice3: idea\n\nAnswer format: choice1/choice2/choice3", "input": "", "answer": "choice1"},
    {"instruction": "Please pick the best ending for the text: Water boils at one hundred\n\nChoice1: degrees "
     "Celsius Choice2: apples Choice3: miles per hour\n\nAnswer format: choice1/choice2/choice3", "input": "",
     "answer": "choice1"},
    {"instruction": "Please pick the best ending for the text: She opened the door with a\n\nChoice1: key "
     "Choice2: sandwich Choice3: cloud\n\nAnswer format: choice1/choice2/choice3", "input": "", "answer": "choice1"},
]


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A seeded tiny LlamaForCausalLM (real architecture) with the offline Llama-3 tokenizer (adds BOS)."""
    from transformers import LlamaForCausalLM

    from mlan.families.tiny import LLAMA3_VOCAB, tiny_llama_config
    from mlan.tokenizer import load_tokenizer

    out = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(vocab_size=LLAMA3_VOCAB)).save_pretrained(out)
    load_tokenizer("llama3").save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def generic_file(tmp_path_factory) -> Path:
    f = tmp_path_factory.mktemp("generic") / "endings_test.json"
    f.write_text(json.dumps(GENERIC))
    return f


# ---------------------------------------------------------------- parsing (checked against the raw text by hand)
def test_every_real_record_parses_and_the_first_ones_read_as_written(shared_data) -> None:
    ev = shared_data / "eval"
    for name in FILES:
        recs = json.loads((ev / f"{name}_test.json").read_text())
        assert all(parse_adapters(r["instruction"], r["answer"]) for r in recs), name
    first = {name: json.loads((ev / f"{name}_test.json").read_text())[0] for name in FILES}
    arc = parse_adapters(first["arc-easy"]["instruction"], first["arc-easy"]["answer"])
    assert arc.question == "Which statement best explains why photosynthesis is the foundation of most food webs?"
    assert arc.options == ("Sunlight is the source of energy for nearly all ecosystems.",
                           "Most ecosystems are found on land instead of in water.",
                           "Carbon dioxide is more available than other gases.",
                           "The producers in all ecosystems are plants.") and arc.gold == 0
    piqa = parse_adapters(first["piqa"]["instruction"], first["piqa"]["answer"])
    assert piqa.question == "How do I ready a guinea pig cage for it's new occupants?" and piqa.gold == 0
    assert piqa.options[1].endswith("ripped jeans material, you will also need to supply it with a water bottle "
                                    "and a food dish.")
    wino = parse_adapters(first["winogrande"]["instruction"], first["winogrande"]["answer"])
    assert wino.question == "Sarah was a much better surgeon than Maria so _ always got the easier cases."
    assert (wino.options, wino.gold) == (("Sarah", "Maria"), 1)
    boolq = parse_adapters(first["boolq"]["instruction"], first["boolq"]["answer"])
    assert (boolq.question, boolq.options, boolq.gold) == (
        "does ethanol take more energy make that produces?", ("no", "yes"), 0)


def test_prompts_are_lm_evals(shared_data, generic_file) -> None:
    ev = shared_data / "eval"
    want = {
        "arc-easy": (("Question: Which statement best explains why photosynthesis is the foundation of most food "
                     "webs?\nAnswer:"), " Sunlight is the source of energy for nearly all ecosystems."),
        "openbookqa": (("A person wants to start saving money so that they can afford a nice vacation at the end of "
                       "the year. After looking over their budget and expenses, they decide the best way to save "
                       "money is to"), " make more phone calls"),
        "boolq": ("\nQuestion: does ethanol take more energy make that produces?\nAnswer:", " no"),
        "winogrande": ("Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases."),
    }
    for name, (ctx, cont) in want.items():
        task = load_task(ev / f"{name}_test.json", limit=1)
        assert task.protocol == "lm-eval" and task.items[0].cloze.requests[0] == (ctx, cont), name
    generic = load_task(generic_file)
    assert generic.style == "cloze" and generic.items[0].cloze.requests[1] == (
        "Question: The cat sat on the\nAnswer:", " moon")
    assert [it.answer for it in generic.items] == ["mat", "degrees Celsius", "key"]


def test_unparseable_records_are_skipped_and_none_parsing_is_n0(tmp_path, capsys) -> None:
    f = tmp_path / "odd_test.json"
    f.write_text(json.dumps([GENERIC[0], {"instruction": "Say something. Answer format: a/b", "answer": "a"}]))
    task = load_task(f)
    assert len(task.items) == 1 and task.skipped == ("1",)
    assert "odd_test.json: 1 of 2 records" in capsys.readouterr().err  # the skip's one warning line
    none = tmp_path / "none_test.json"
    none.write_text(json.dumps([{"instruction": "Say something.\n\nAnswer format: a/b", "answer": "a"}]))
    with pytest.raises(UserError, match="none of its 1 records parses"):
        load_task(none)
    assert main(["eval", "no-model-needed", "--tasks", str(none)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "none_test.json" in err and "n = 0" in err


def test_n0_is_a_one_line_error(tmp_path, shared_data, capsys) -> None:
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    arc = shared_data / "eval" / "arc-easy_test.json"
    for args in (["--tasks", str(empty)], ["--tasks", str(arc), "--limit", "0"]):
        assert main(["eval", "no-model-needed", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and ("no records" in err or "n = 0" in err), err


def test_limit_and_items_select_the_same_items(tmp_path, shared_data) -> None:
    arc = shared_data / "eval" / "arc-easy_test.json"
    assert [it.id for it in load_task(arc, limit=4).items] == ["0", "1", "2", "3"]
    ids = tmp_path / "ids.txt"
    ids.write_text("7\n2\n")
    assert [it.id for it in load_task(arc, items=ids).items] == ["2", "7"]  # file order, not the list's
    lines = tmp_path / "run.items.jsonl"
    lines.write_text("".join(json.dumps({"task": t, "id": i}) + "\n" for t, i in
                             [("arc-easy_test", "5"), ("arc-easy_test", "9"), ("other", "1")]))
    assert [it.id for it in load_task(arc, items=lines).items] == ["5", "9"]
    ids.write_text("3\nno-such-id\n")
    with pytest.raises(UserError, match="no item with id 'no-such-id'"):
        load_task(arc, items=ids)
    with pytest.raises(UserError, match="lists no ids for task 'piqa_test'"):
        load_task(shared_data / "eval" / "piqa_test.json", items=lines)


def test_mlan_paper_prompt_and_answers() -> None:
    parsed = parse_adapters(GENERIC[0]["instruction"], GENERIC[0]["answer"])
    assert paper_prompt(parsed) == "The cat sat on the Choose the best option from below:\nA. mat\nB. moon\nC. idea"
    opts = parsed.options
    assert [paper_answer(g, opts) for g in ('A".', 'b"', 'C. idea"', 'moon" because', "D", "")] == [
        "mat", "moon", "idea", "moon", None, None]


# ---------------------------------------------------------------- the contract
def test_results_file_and_items_file_follow_the_contract(tiny_llama_dir, shared_data, tmp_path) -> None:
    ev = shared_data / "eval"
    out = tmp_path / "res.json"
    assert main(["eval", str(tiny_llama_dir), "--tasks", str(ev / "arc-easy_test.json"),
                 str(ev / "winogrande_test.json"), f"gsm={ev / 'gsm8k_test.jsonl'}", "--limit", "6",
                 "--max-new-tokens", "2", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    lines = [json.loads(x) for x in items_path(out).read_text().splitlines()]
    assert items_path(out).name == "res.items.jsonl"
    assert (res["protocol"], res["chat_template"]) == ("lm-eval", False)
    assert [(r["task"], r["id"]) for r in lines] == [(t, str(i)) for t in ("arc-easy_test", "winogrande_test", "gsm")
                                                     for i in range(6)]
    for name, t in res["tasks"].items():
        mine = [r for r in lines if r["task"] == name]
        k = sum(r["correct"] for r in mine)
        assert t["n"] == 6 and t["accuracy"] == pytest.approx(100 * k / 6)
        assert t["ci95"] == pytest.approx(list(wilson_ci(k, 6))) and t["items_file"] == "res.items.jsonl"
        gold_counts = Counter(r["gold"] for r in mine)
        assert t["majority"] == pytest.approx(100 * max(gold_counts.values()) / 6)
        assert all(r["correct"] == (r["prediction"] == r["gold"]) for r in mine)
    arc, wino, gsm = res["tasks"]["arc-easy_test"], res["tasks"]["winogrande_test"], res["tasks"]["gsm"]
    assert (arc["protocol"], arc["metric"], arc["chance"]) == ("lm-eval", "acc", 25.0)
    assert arc["acc"]["value"] == arc["accuracy"] and "acc_norm" in arc
    norm_k = sum(r["correct_norm"] for r in lines if r["task"] == "arc-easy_test")
    assert arc["acc_norm"]["ci95"] == pytest.approx(list(wilson_ci(norm_k, 6)))
    assert "acc_norm" not in wino and wino["chance"] == 50.0  # partial scoring: acc only
    assert all(len(r["loglik"]) == 2 and "correct_norm" not in r for r in lines if r["task"] == "winogrande_test")
    assert (gsm["protocol"], gsm["metric"], gsm["chance"]) == ("generate", "exact_match", 0.0)
    lang = res["groups"]["language"]
    assert lang["n"] == 18 and lang["accuracy"] == pytest.approx(100 * sum(r["correct"] for r in lines) / 18)

    # --items from that run's items file scores exactly the same items (here a subset: two of them)
    pick = tmp_path / "pick.jsonl"
    pick.write_text("".join(json.dumps(r) + "\n" for r in lines if r["task"] == "arc-easy_test" and r["id"] in "14"))
    again = evaluate(str(tiny_llama_dir), [str(ev / "arc-easy_test.json")], items=pick, keep_records=True)
    recs = again["tasks"]["arc-easy_test"]["records"]
    assert [r["id"] for r in recs] == ["1", "4"]
    first = [ll for r in lines if r["task"] == "arc-easy_test" and r["id"] in "14" for ll in r["loglik"]]
    assert [ll for r in recs for ll in r["loglik"]] == pytest.approx(first, abs=1e-4)


def test_labels_and_mlan_paper_protocols_name_themselves(tiny_llama_dir, generic_file, tmp_path) -> None:
    lm = load_model(str(tiny_llama_dir))
    labels = evaluate_tasks(lm, [load_task(generic_file, protocol="labels")], keep_records=True)
    t = labels["tasks"]["endings_test"]
    assert t["protocol"] == "labels" and {r["prediction"] for r in t["records"]} <= {"choice1", "choice2", "choice3"}
    paper = evaluate_tasks(lm, [load_task(generic_file, protocol="mlan-paper")], keep_records=True)
    t = paper["tasks"]["endings_test"]
    assert (t["protocol"], t["metric"], t["chance"]) == ("mlan-paper", "exact_match", pytest.approx(100 / 3))
    assert all("generation" in r for r in t["records"])
    out = tmp_path / "p.json"
    write_results({"model": "m", "protocol": "mlan-paper", **paper}, out)
    assert "records" not in json.loads(out.read_text())["tasks"]["endings_test"]
    assert len(items_path(out).read_text().splitlines()) == 3


# ---------------------------------------------------------------- equal to lm-evaluation-harness
def _lm_eval_tasks(shared_data: Path, generic_file: Path, n: int) -> dict:
    """name → (mlan task, lm-eval style, lm-eval docs) for every real file and the unseen generic one."""
    out = {}
    paths = [shared_data / "eval" / f"{f}_test.json" for f in FILES] + [generic_file]
    for p in paths:
        task = load_task(p, limit=n)
        recs = json.loads(p.read_text())[:n]
        docs = [lm_eval_doc(task.style, parse_adapters(r["instruction"], r["answer"])) for r in recs]
        out[task.name] = (task, task.style, docs)
    return out


def _assert_equal_to_lm_eval(model_dir: str, tasks: dict, folder: Path, chat_template: bool = False) -> None:
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness (the dev extra's lm-eval==0.4.13) is not installed")
    import lmeval_reference

    want = lmeval_reference.run(model_dir, {k: (s, d) for k, (_, s, d) in tasks.items()}, folder,
                                apply_chat_template=chat_template)
    lm = load_model(model_dir)
    res = evaluate_tasks(lm, [t for t, _, _ in tasks.values()], batch_size=3, keep_records=True,
                         chat_template=chat_template)
    for name, (task, _, _) in tasks.items():
        got = res["tasks"][name]["records"]
        assert len(got) == len(want[name]) == len(task.items)
        for r, w in zip(got, want[name]):
            assert r["loglik"] == pytest.approx(w["lls"], abs=1e-3), (name, r["id"])
            assert r["correct"] == bool(w["acc"]), (name, r["id"])
            if w["acc_norm"] is not None:
                assert r["correct_norm"] == bool(w["acc_norm"]), (name, r["id"])
            else:
                assert "correct_norm" not in r
        # predictions, not just correctness: the argmax of lm-eval's own log-likelihoods
        assert [r["prediction"] for r in got] == [task.items[k].choices[max(range(len(w["lls"])),
                                                  key=lambda j, w=w: (w["lls"][j], -j))]
                                                  for k, w in enumerate(want[name])]


@pytest.mark.slow
def test_tiny_llama_equals_lm_evaluation_harness_on_every_task(tiny_llama_dir, shared_data, generic_file,
                                                                tmp_path) -> None:
    _assert_equal_to_lm_eval(str(tiny_llama_dir), _lm_eval_tasks(shared_data, generic_file, 4), tmp_path)


@pytest.mark.slow
def test_chat_template_equals_lm_evaluation_harness_apply_chat_template(tiny_llama_dir, shared_data, generic_file,
                                                                        tmp_path) -> None:
    tasks = _lm_eval_tasks(shared_data, generic_file, 3)
    _assert_equal_to_lm_eval(str(tiny_llama_dir), {k: tasks[k] for k in ("arc-easy_test", "winogrande_test")},
                             tmp_path, chat_template=True)


@pytest.mark.slow
def test_smollm2_equals_lm_evaluation_harness_on_every_task(shared_data, generic_file, tmp_path) -> None:
    from mlan.pretrained import resolve_model_path

    try:
        model = resolve_model_path("smollm2-135m-instruct")
    except UserError as err:
        pytest.skip(f"SmolLM2-135M-Instruct is not available offline: {err}")
    _assert_equal_to_lm_eval(model, _lm_eval_tasks(shared_data, generic_file, 6), tmp_path)  # per item: 6 a task


@pytest.mark.slow
def test_two_processes_write_the_files_of_one(tiny_llama_dir, shared_data, tmp_path) -> None:
    ev = shared_data / "eval"
    files = {}
    for nproc in (1, 2):
        out = tmp_path / f"n{nproc}.json"
        assert main(["eval", str(tiny_llama_dir), "--tasks", str(ev / "arc-easy_test.json"),
                     str(ev / "winogrande_test.json"), "--limit", "5", "--batch-size", "2", "--nproc", str(nproc),
                     "--out", str(out)]) == 0
        files[nproc] = (json.loads(out.read_text()), [json.loads(x) for x in items_path(out).read_text().splitlines()])
    (one, one_items), (two, two_items) = files[1], files[2]
    assert len(one_items) == 10
    strip = lambda r: {k: v for k, v in r.items() if k != "loglik"}
    assert [strip(r) for r in two_items] == [strip(r) for r in one_items]
    for a, b in zip(one_items, two_items):
        assert b["loglik"] == pytest.approx(a["loglik"], abs=1e-4)
    for name, t in one["tasks"].items():
        assert {**t, "items_file": "-"} == {**two["tasks"][name], "items_file": "-"}
    assert one["groups"] == two["groups"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_eval_on_the_gpu_equals_eval_on_the_cpu(tiny_llama_dir, shared_data, tmp_path) -> None:
    """`mlan eval` scores on the GPU when there is one (`eval_device`), and `--nproc 2` gathers over NCCL; the
    per-item predictions equal a CPU run's (CUDA hidden) and the log-likelihoods agree within 1e-3 nats."""
    import os
    import subprocess
    import sys

    from mlan.eval.loading import eval_device

    assert eval_device().type == "cuda"
    ev = shared_data / "eval"
    argv = ["eval", str(tiny_llama_dir), "--tasks", str(ev / "arc-easy_test.json"), str(ev / "winogrande_test.json"),
            "--limit", "6", "--batch-size", "3"]
    runs = {}
    for name, nproc, env in (("gpu", 1, {}), ("nccl", 2, {}), ("cpu", 1, {"CUDA_VISIBLE_DEVICES": ""})):
        out = tmp_path / f"{name}.json"
        subprocess.run([sys.executable, "-m", "mlan.cli", *argv, "--nproc", str(nproc), "--out", str(out)],
                       env={**os.environ, **env}, check=True, timeout=600)
        runs[name] = [json.loads(x) for x in items_path(out).read_text().splitlines()]
    assert len(runs["cpu"]) == 12
    for name in ("gpu", "nccl"):
        assert [r["prediction"] for r in runs[name]] == [r["prediction"] for r in runs["cpu"]]
        for a, b in zip(runs["cpu"], runs[name]):
            assert b["loglik"] == pytest.approx(a["loglik"], abs=1e-3)
