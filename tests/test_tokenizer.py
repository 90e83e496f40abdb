"""The offline Llama-3 tokenizer against tiktoken built from the same tokenizer.model (llama_models' own)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mlan.tokenizer import (
    IMAGE_TOKEN,
    is_offline_llama3,
    llama3_special_tokens,
    llama3_tiktoken,
    load_tokenizer,
    tokenizer_fingerprint,
)


@pytest.fixture(scope="module")
def tiktoken_reference():
    """llama_models' Tokenizer: a tiktoken.Encoding over the same rank file with the Llama-3 pattern."""
    from llama_models.llama3.tokenizer import Tokenizer

    return Tokenizer.get_instance()


def _real_texts(shared_data) -> list[str]:
    alpaca = json.loads((shared_data / "text/alpaca_en_demo.json").read_text())
    sharegpt = json.loads((shared_data / "text/sharegpt_dummy_conversation.json").read_text())
    gsm8k = [json.loads(line) for line in (shared_data / "text/gsm8k_train.jsonl").read_text().splitlines()[:300]]
    texts = [r["instruction"] + "\n" + r["input"] + "\n\n" + r["output"] for r in alpaca]
    texts += [t["value"] for r in sharegpt[:200] for t in r["conversations"]]
    texts += [r["question"] + "\n" + r["answer"] for r in gsm8k]
    # whole files as text: JSON punctuation, escaped and raw Unicode, indentation runs
    texts.append((shared_data / "text/alpaca_en_demo.json").read_text()[:200_000])
    texts.append(json.dumps(alpaca[:200], ensure_ascii=False, indent=4))
    texts.append((shared_data / "README.md").read_text())
    return texts


EDGE_TEXTS = [
    "def f(x):\n\tif x  >  10:\n\t\treturn x**2   # comment\n\n\n    return -x\r\n",
    "12345678901234567890 3.14159 1,000,000 0x1F 2024-11-23",
    "naïve café — “quotes” Ünïcödé 日本語のテキスト 中文 한국어 Ελληνικά русский 🤖🚀 e\u0301",
    "     leading spaces\n\n\n\n   trailing   \t\t\n",
    "I'm you'RE they'll we'd it's   'S 'LL",
    "",
    " ",
    "\n",
]


def test_ids_equal_tiktoken_on_real_text(llama3_tokenizer, tiktoken_reference, shared_data):
    texts = _real_texts(shared_data) + EDGE_TEXTS
    ours = llama3_tokenizer(texts, add_special_tokens=False)["input_ids"]
    n_tokens = 0
    for text, ids in zip(texts, ours):
        ref = tiktoken_reference.model.encode(text, disallowed_special=())
        assert ids == ref, f"mismatch on {text[:80]!r}"
        n_tokens += len(ids)
        assert llama3_tokenizer.decode(ids) == text
    assert n_tokens > 200_000  # the comparison covered a real amount of text


def test_special_tokens_and_ids(llama3_tokenizer, tiktoken_reference):
    tok = llama3_tokenizer
    assert len(tok) == 128257
    assert tok.convert_tokens_to_ids(IMAGE_TOKEN) == 128256
    expected = {
        "<|begin_of_text|>": 128000, "<|end_of_text|>": 128001, "<|finetune_right_pad_id|>": 128004,
        "<|step_id|>": 128005, "<|start_header_id|>": 128006, "<|end_header_id|>": 128007,
        "<|eom_id|>": 128008, "<|eot_id|>": 128009, "<|python_tag|>": 128010,
    }
    for name, i in expected.items():
        assert tok.convert_tokens_to_ids(name) == i
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (128000, 128009, 128004)
    # every special has llama_models' name and id, except 128011 (llama_models' native `<|image|>`)
    ref = {i: name for name, i in tiktoken_reference.special_tokens.items()}
    names = llama3_special_tokens()
    assert len(names) == 256 == len(set(names + [IMAGE_TOKEN])) - 1
    for i, name in enumerate(names):
        assert tok.convert_ids_to_tokens(128000 + i) == name
        if 128000 + i != 128011:
            assert ref[128000 + i] == name
    # specials in text are single tokens; BOS only with add_special_tokens
    ids = tok("<|start_header_id|>user<|end_header_id|>\n\nhi<|image|><|eot_id|>")["input_ids"]
    assert ids == [128000, 128006, 882, 128007, 271, 6151, 128256, 128009]


def test_chat_template_is_llama3(llama3_tokenizer, tiktoken_reference):
    """The stored chat template renders the Llama-3 format; checked against llama_models' ChatFormat."""
    from llama_models.datatypes import RawMessage
    from llama_models.llama3.chat_format import ChatFormat

    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
    ]
    ours = llama3_tokenizer.apply_chat_template(msgs, tokenize=True)["input_ids"]
    fmt = ChatFormat(tiktoken_reference)
    ref = [tiktoken_reference.bos_id]
    for m in msgs:
        ref += fmt.encode_message(RawMessage(role=m["role"], content=m["content"]), tool_prompt_format=None)[0]
    assert ours == ref


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_concurrent_first_conversion_is_safe(tmp_path, llama3_tokenizer):
    """Two processes converting into an empty cache at once both succeed and agree with each other."""
    code = (
        "from mlan.tokenizer import load_tokenizer, tokenizer_fingerprint;"
        "t = load_tokenizer('llama3'); print(tokenizer_fingerprint(t))"
    )
    env = {**os.environ, "MLAN_CACHE": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=110)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outs[0] == outs[1] == tokenizer_fingerprint(llama3_tokenizer)
    published = [p for p in (tmp_path / "tokenizers").iterdir()]
    assert len(published) == 1 and (published[0] / "tokenizer.json").is_file()  # no temp folders left


def test_other_names_load_from_local_path(tmp_path, llama3_tokenizer):
    llama3_tokenizer.save_pretrained(tmp_path / "tok")
    tok = load_tokenizer(str(tmp_path / "tok"))
    assert tokenizer_fingerprint(tok) == tokenizer_fingerprint(llama3_tokenizer)
    assert tok("héllo  wörld", add_special_tokens=False)["input_ids"] == llama3_tokenizer(
        "héllo  wörld", add_special_tokens=False
    )["input_ids"]
    with pytest.raises((OSError, ValueError)):
        load_tokenizer(str(tmp_path / "does-not-exist"))
    # a saved copy is still recognised as the offline tokenizer (the renderer then encodes with tiktoken)
    assert is_offline_llama3(tok) and is_offline_llama3(llama3_tokenizer)


def test_tiktoken_fast_path_matches(llama3_tokenizer, tiktoken_reference):
    enc = llama3_tiktoken()
    for text in EDGE_TEXTS + ["Say <|eot_id|> and <|image|> as text."]:
        assert enc.encode_ordinary(text) == tiktoken_reference.model.encode_ordinary(text)
