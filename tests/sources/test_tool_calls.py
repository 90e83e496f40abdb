"""Tool use end to end: schemas reach the prompt, assistant calls are trained, tool outputs never are.

The reference is `apply_chat_template(messages, tools=…, return_assistant_tokens_mask=True)` over messages built
here straight from the fixture JSON (not through mlan.sources), with tests/fixtures/llama31_tools.jinja: Llama-3.1's
JSON tool-calling layout written as a chat template, with `{% generation %}` around what is trained.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

from mlan.recipe import ModelSpec, SourceSpec
from mlan.render import Renderer
from mlan.sources import iter_conversations, to_conversation
from mlan.sources.records import Conversation, RecordError

FIXTURES = Path(__file__).parents[1] / "fixtures"
TOOLS_JINJA = (FIXTURES / "llama31_tools.jinja").read_text()
OPENAI = FIXTURES / "formats" / "openai_tools.jsonl"
SHAREGPT = FIXTURES / "formats" / "sharegpt_tools.json"


# ------------------------------------------------------------------ the reference, from the raw JSON
def _args(value) -> dict:
    return json.loads(value) if isinstance(value, str) else value


def _openai_reference(rec: dict) -> tuple[list[dict], list[dict]]:
    msgs = []
    for m in rec["messages"]:
        out = {"role": m["role"], "content": m.get("content") or ""}
        if m.get("tool_calls"):
            out["tool_calls"] = [{"type": "function", "function": {"name": c["function"]["name"],
                                                                   "arguments": _args(c["function"]["arguments"])}}
                                 for c in m["tool_calls"]]
        if "loss_weight" in m:
            out["loss_weight"] = m["loss_weight"]
        msgs.append(out)
    return msgs, rec["tools"]


def _sharegpt_reference(rec: dict) -> tuple[list[dict], list[dict]]:
    roles = {"human": "user", "gpt": "assistant", "observation": "tool"}
    msgs = [{"role": "system", "content": rec["system"]}] if rec.get("system") else []
    for turn in rec["conversations"]:
        if turn["from"] == "function_call":
            calls = json.loads(turn["value"])
            calls = calls if isinstance(calls, list) else [calls]
            msgs.append({"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": c["name"], "arguments": _args(c["arguments"])}} for c in calls]})
        else:
            msgs.append({"role": roles[turn["from"]], "content": turn["value"]})
    return msgs, [{"type": "function", "function": t} for t in json.loads(rec["tools"])]


def _records() -> list[tuple[str, dict]]:
    openai = [("messages", json.loads(line)) for line in OPENAI.read_text().splitlines()]
    return openai + [("sharegpt", r) for r in json.loads(SHAREGPT.read_text())]


@pytest.fixture(scope="module")
def tools_tokenizer(llama3_tokenizer):
    """The offline Llama-3 tokenizer with the tool-aware chat template (a copy: the session's stays as it is)."""
    tok = copy.deepcopy(llama3_tokenizer)
    tok.chat_template = TOOLS_JINJA
    return tok


@pytest.fixture(scope="module")
def conversations() -> dict[str, list[Conversation]]:
    out = {}
    for fmt, path in (("messages", OPENAI), ("sharegpt", SHAREGPT)):
        items = list(iter_conversations(SourceSpec(name=f"{fmt}_tools", path=str(path), format=fmt, modality="text")))
        assert not [i for i in items if isinstance(i, RecordError)], [str(i) for i in items]
        out[fmt] = items
    return out


def _renderer(tok, template: str) -> Renderer:
    return Renderer(ModelSpec(family="llava", template=template), 8192, "truncate", tokenizer=tok)


def _pairs(conversations) -> list[tuple[Conversation, list[dict], list[dict]]]:
    convs = conversations["messages"] + conversations["sharegpt"]
    refs = [(_openai_reference if fmt == "messages" else _sharegpt_reference)(rec) for fmt, rec in _records()]
    assert len(convs) == len(refs) == 6
    return [(c, m, t) for c, (m, t) in zip(convs, refs)]


# ------------------------------------------------------------------ token for token
@pytest.mark.parametrize("template", ["llama3", "tokenizer"])
def test_tool_calls_equal_apply_chat_template(tools_tokenizer, conversations, template):
    """Several tools, parallel calls, multi-turn with tool outputs, loss_weight 0: ids and masks == the reference."""
    r = _renderer(tools_tokenizer, template)
    for conv, msgs, tools in _pairs(conversations):
        ref = tools_tokenizer.apply_chat_template(msgs, tools=tools, tokenize=True, return_dict=True,
                                                  return_assistant_tokens_mask=True)
        doc = r.render(conv)
        assert doc.input_ids.tolist() == ref["input_ids"], conv.id
        assert doc.loss_mask.tolist() == ref["assistant_masks"], conv.id


def test_schemas_reach_the_prompt_and_tool_outputs_are_never_trained(tools_tokenizer, conversations):
    r = _renderer(tools_tokenizer, "llama3")
    for (fmt, rec), conv in zip(_records(), conversations["messages"] + conversations["sharegpt"]):
        doc = r.render(conv)
        prompt = tools_tokenizer.decode(doc.input_ids[doc.loss_mask == 0].tolist())
        tools = rec["tools"] if fmt == "messages" else [{"function": t} for t in json.loads(rec["tools"])]
        for tool in tools:  # every schema, with its description, is in the untrained prompt
            assert json.dumps(tool["function"]["description"], ensure_ascii=False) in prompt
        n_outputs = sum(m["role"] == "tool" for m in rec.get("messages", []))
        n_outputs += sum(t["from"] == "observation" for t in rec.get("conversations", []))
        ids = doc.input_ids.tolist()
        ipython = tools_tokenizer.encode("<|start_header_id|>ipython<|end_header_id|>", add_special_tokens=False)
        starts = [i for i in range(len(ids)) if ids[i:i + len(ipython)] == ipython]
        assert len(starts) == n_outputs  # every tool output is an ipython turn …
        for start in starts:  # … and none of it, up to and including its <|eot_id|>, is trained
            end = ids.index(128009, start)
            assert not doc.loss_mask[start:end + 1].any()


def test_assistant_calls_are_trained_as_json(tools_tokenizer, conversations):
    doc = _renderer(tools_tokenizer, "llama3").render(conversations["messages"][0])
    trained = tools_tokenizer.decode(doc.input_ids[doc.loss_mask == 1].tolist())
    assert trained.startswith('{"name": "get_weather", "parameters": {"city": "Lyon", "unit": "celsius"}}; '
                              '{"name": "get_local_time", "parameters": {"city": "Lyon"}}<|eot_id|>')
    assert '{"name": "get_weather", "parameters": {"city": "Oslo"}}<|eot_id|>' in trained


def test_loss_weight_zero_call_is_rendered_not_trained(tools_tokenizer, conversations):
    conv = conversations["messages"][3]
    assert [m.trained for m in conv.messages if m.role == "assistant"] == [False, True]
    doc = _renderer(tools_tokenizer, "llama3").render(conv)
    text = tools_tokenizer.decode(doc.input_ids.tolist())
    trained = tools_tokenizer.decode(doc.input_ids[doc.loss_mask == 1].tolist())
    assert '"Bergen"' in text and '"Bergen"' not in trained and trained.startswith("Yes, it is raining")


# ------------------------------------------------------------------ refusals instead of silent loss
def test_tokenizer_template_without_tools_support_is_refused(llama3_tokenizer, conversations):
    """The offline tokenizer's own template ignores `tools=`: refusing beats training on unseen schemas."""
    out = _renderer(llama3_tokenizer, "tokenizer").render_batch(conversations["sharegpt"])
    assert all(isinstance(o, RecordError) and "ignores `tools`" in o.reason for o in out)


def test_vicuna_refuses_tool_conversations(llama3_tokenizer, conversations):
    out = _renderer(llama3_tokenizer, "vicuna_v1").render_batch(conversations["messages"][:1])
    assert isinstance(out[0], RecordError) and "no tool-calling format" in out[0].reason


def test_llama3_refuses_text_beside_a_tool_call(llama3_tokenizer):
    record = {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}], "messages": [
        {"role": "system", "content": "Be terse."}, {"role": "user", "content": "call f"},
        {"role": "assistant", "content": "Sure, calling f.", "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]}]}
    conv = to_conversation(SourceSpec(name="t", path="t.jsonl", format="messages", modality="text"), 0, record, "t.jsonl")
    out = _renderer(llama3_tokenizer, "llama3").render_batch([conv])
    assert isinstance(out[0], RecordError) and "both text and tool calls" in out[0].reason
    assert out[0].field == "messages[2]"  # the index in the conversation, system message included


def test_sharegpt_tools_were_dropped_before(conversations):
    """The defect: tools schemas were silently dropped and function_call / observation turns rejected."""
    convs = conversations["sharegpt"]
    assert [len(c.tools) for c in convs] == [2, 2]
    assert [len(m.tool_calls) for m in convs[1].messages if m.tool_calls] == [3, 1]
    assert [m.role for m in convs[0].messages] == ["user", "assistant", "tool", "assistant"]
    assert np.all([isinstance(json.loads(t), dict) for c in convs for t in c.tools])
