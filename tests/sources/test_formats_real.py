"""Formats users have today (issue 11, item 5), on fixtures written for these tests (tests/fixtures/formats/).

Each test names the defect it pins; every one failed on the code before the fix (rejected records, silently
dropped or mis-trained content, an uninformative reason, or `mlan render` exiting 0).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlan.recipe import ModelSpec, SourceSpec
from mlan.render import Renderer
from mlan.sources import iter_conversations
from mlan.sources.records import Conversation, Image, RecordError

FIXTURES = Path(__file__).parents[1] / "fixtures" / "formats"
EOT = "<|eot_id|>"


def _spec(file: str, fmt: str, modality: str = "text", **kw) -> SourceSpec:
    return SourceSpec(name=Path(file).stem, path=str(FIXTURES / file), format=fmt, modality=modality, **kw)


def _convert(spec: SourceSpec) -> list[Conversation | RecordError]:
    return list(iter_conversations(spec))


def _renderer(tok, template: str = "llama3") -> Renderer:
    return Renderer(ModelSpec(family="llava", template=template), 8192, "truncate", tokenizer=tok)


def _trained_text(tok, doc) -> str:
    return tok.decode(doc.input_ids[doc.loss_mask == 1].tolist())


# ------------------------------------------------------------------ LLaMA-Factory `messages`
def test_llamafactory_value_parts_and_image_url(llama3_tokenizer):
    """Defect: every record with {"type": "text", "value": …} parts was rejected."""
    out = _convert(_spec("llamafactory_messages.jsonl", "messages", "image_text"))
    assert all(isinstance(c, Conversation) for c in out), [str(c) for c in out]
    first = out[0]
    assert [m.role for m in first.messages] == ["system", "user", "assistant"]
    assert first.messages[1].text == "What colour is this square?"
    assert isinstance(first.messages[1].parts[-1], Image) and first.messages[1].parts[-1].ref.path.endswith("red.png")
    doc = _renderer(llama3_tokenizer).render(first)
    assert doc.n_images == 1 and doc.image_sizes == [(8, 6)]
    assert _trained_text(llama3_tokenizer, doc) == "It is red." + EOT


def test_llamafactory_loss_weight_zero_is_not_trained(llama3_tokenizer):
    """Defect: loss_weight was ignored (the record was rejected before it could be)."""
    conv = _convert(_spec("llamafactory_messages.jsonl", "messages", "image_text"))[1]
    assert [m.trained for m in conv.messages if m.role == "assistant"] == [False, True]
    doc = _renderer(llama3_tokenizer).render(conv)
    messages = [{"role": m.role, "content": m.text} for m in conv.messages]
    reference = llama3_tokenizer.apply_chat_template(messages)["input_ids"]
    assert doc.input_ids.tolist() == reference  # rendered like any conversation …
    assert _trained_text(llama3_tokenizer, doc) == "Sorry: seven." + EOT  # … but "Nine." is not trained


def test_llamafactory_tool_call_parts(llama3_tokenizer):
    conv = _convert(_spec("llamafactory_messages.jsonl", "messages", "image_text"))[2]
    assert [m.role for m in conv.messages] == ["user", "assistant", "tool", "assistant"]
    assert conv.tool_schemas[0]["function"]["name"] == "lookup_capital"
    doc = _renderer(llama3_tokenizer).render(conv)
    assert _trained_text(llama3_tokenizer, doc) == (
        '{"name": "lookup_capital", "parameters": {"country": "Chile"}}' + EOT + "The capital of Chile is Santiago." + EOT)
    assert '"description": "Capital city of a country."' in llama3_tokenizer.decode(doc.input_ids.tolist())


# ------------------------------------------------------------------ OpenAssistant trees
BEST = {
    0: ["How do I boil an egg?", "Simmer it for nine minutes, then cool it in cold water.", "And for a soft yolk?",
        "Six to seven minutes, then straight into ice water."],
    1: ["Name a blue fruit.", "Blueberries are blue."],  # ranked before unranked
}
ALL = [  # rank order at every level; a prompt nobody answered ("Thanks!") is cut; the deleted reply is skipped
    BEST[0],
    BEST[0][:3] + ["About six minutes."],
    BEST[0][:2],
    ["How do I boil an egg?", "Boil water, add egg, wait."],
    ["How do I boil an egg?", "Put it in a microwave."],
    BEST[1],
    ["Name a blue fruit.", "A blueberry."],
]


def test_oasst_best_ranked_path():
    out = _convert(_spec("oasst_trees.jsonl", "oasst"))
    assert [[m.text for m in c.messages] for c in out] == [BEST[0], BEST[1]]
    assert [m.role for m in out[0].messages] == ["user", "assistant", "user", "assistant"]


def test_oasst_every_path_on_request():
    from mlan.sources import iter_source, to_conversations

    spec = _spec("oasst_trees.jsonl", "oasst", tree_paths="all")
    convs = [c for file, index, rec in iter_source(spec) for c in to_conversations(spec, index, rec, file)]
    assert [[m.text for m in c.messages] for c in convs] == ALL
    assert len({c.id for c in convs}) == len(ALL)
    # a one-conversation reader is told, not handed the first path silently
    out = _convert(spec)
    assert all(isinstance(e, RecordError) and "tree_paths: all gives" in e.reason for e in out)


def test_a_tree_read_as_messages_says_it_is_a_tree():
    """Defect: "missing field 'messages'", which does not say that trees are a different shape."""
    for fmt in ("messages", "sharegpt"):
        out = _convert(_spec("oasst_trees.jsonl", fmt))
        assert all(isinstance(e, RecordError) and "message tree" in e.reason and "format: oasst" in e.reason
                   for e in out), [str(e) for e in out]


# ------------------------------------------------------------------ video
def test_video_input_is_rejected():
    """Defect: records with `videos` were accepted as text with a literal <video> in the prompt."""
    out = _convert(_spec("videos.jsonl", "messages", "image_text"))
    assert [e.field if isinstance(e, RecordError) else None for e in out] == [
        "videos", "messages[0].content", "messages[0].content[0].type", None]
    assert all("video input is not supported" in e.reason for e in out[:3])
    # a text source whose record has no media may mention a literal <video> (HTML), as it may <image>
    out = _convert(_spec("videos.jsonl", "messages", "text"))
    assert isinstance(out[0], RecordError) and out[0].field == "videos" and isinstance(out[2], RecordError)
    assert isinstance(out[1], Conversation) and out[1].messages[0].text == "<video>What happens?"


# ------------------------------------------------------------------ prompt_completion end markers
def test_prompt_completion_strips_end_markers(llama3_tokenizer):
    """Defect: `<|endoftext|>` ending a GPT-3-style completion was trained on as literal text."""
    out = _convert(_spec("prompt_completion_markers.jsonl", "prompt_completion"))
    answers = [c.messages[-1].text for c in out]
    assert answers == [" fromage", " 4", " Lima", " the tag is <|endoftext|> inside"]  # only a final marker goes
    assert [c.notes for c in out] == [("stripped end marker",)] * 2 + [()] * 2
    doc = _renderer(llama3_tokenizer).render(out[0])
    assert _trained_text(llama3_tokenizer, doc) == "fromage" + EOT


def test_render_shows_the_stripped_marker(tmp_path, capsys):
    from mlan.cli import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {family: llava, tokenizer: llama3}\n"
                      f"sources:\n  - {{name: pc, path: {FIXTURES / 'prompt_completion_markers.jsonl'}, "
                      "format: prompt_completion, modality: text}\n")
    assert main(["render", str(recipe), "--source", "pc"]) == 0
    heads = [line for line in capsys.readouterr().out.splitlines() if line.startswith("── ")]
    assert [h.endswith(" · stripped end marker") for h in heads] == [True, True, False, False]


def test_prompt_completion_end_markers_are_configurable():
    spec = _spec("prompt_completion_markers.jsonl", "prompt_completion", end_markers=[" inside"])
    out = _convert(spec)
    assert [c.messages[-1].text for c in out] == [" fromage<|endoftext|>", " 4</s>\n", " Lima",
                                                  " the tag is <|endoftext|>"]
    assert [bool(c.notes) for c in out] == [False, False, False, True]


# ------------------------------------------------------------------ shapes that were accepted wrongly
BAD = [
    ("content is null", "messages[0].content"),
    ("a bare string in a list of parts", "messages[0].content[0]"),
    ("must be the user's, got assistant", "messages[0].content"),
    ("must be the user's, got assistant", "messages[1].content"),
    ("loss_weight must be 0 (not trained) or 1 (trained), got 0.5", "messages[1].loss_weight"),
    ("no trained assistant turn", None),
]


def test_bad_shapes_are_rejected_with_a_reason():
    """Defects: content null became an empty turn, bare strings were joined with no separator, and a
    conversation opening with the assistant was trained."""
    out = _convert(_spec("bad_shapes.jsonl", "messages"))
    assert len(out) == len(BAD) + 1 and isinstance(out[-1], Conversation)
    for (reason, field), err in zip(BAD, out):
        assert isinstance(err, RecordError), err
        assert reason in err.reason and err.field == field, str(err)
        assert str(FIXTURES / "bad_shapes.jsonl") in str(err) and f"record {err.index}" in str(err)


def test_sharegpt_conversation_opening_with_gpt_is_rejected(tmp_path):
    data = tmp_path / "sg.json"
    data.write_text(json.dumps([{"conversations": [{"from": "gpt", "value": "Hello."}]},
                                {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": None}]}]))
    out = _convert(SourceSpec(name="sg", path=str(data), format="sharegpt", modality="text"))
    assert "must be the user's, got assistant" in out[0].reason and out[0].field == "conversations[0].value"
    assert "content is null" in out[1].reason and out[1].field == "conversations[1].value"


# ------------------------------------------------------------------ `mlan render`
def test_render_exits_2_when_no_record_renders(tmp_path, capsys):
    """Defect: `mlan render` exited 0 when every record failed."""
    from mlan.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(json.dumps(r) for r in [
        {"messages": [{"role": "assistant", "content": "alone"}]}, {"nothing": 1}]) + "\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {family: llava, tokenizer: llama3}\n"
                      f"sources:\n  - {{name: bad, path: {bad}, format: messages, modality: text}}\n")
    assert main(["render", str(recipe), "--source", "bad"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("mlan render: error: source 'bad': no record rendered (2 rejected, 0 dropped); the first: ")
    assert "must be the user's" in err[-1]


def test_render_shows_every_path_of_every_tree(tmp_path, capsys):
    from mlan.cli import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {family: llava, tokenizer: llama3}\n"
                      f"sources:\n  - {{name: trees, path: {FIXTURES / 'oasst_trees.jsonl'}, format: oasst, "
                      "modality: text, tree_paths: all}\n")
    assert main(["render", str(recipe), "--source", "trees", "--json"]) == 0
    docs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(docs) == len(ALL)


@pytest.mark.parametrize("template", ["llama3", "tokenizer"])
def test_oasst_paths_render_like_apply_chat_template(llama3_tokenizer, template):
    convs = [c for c in _convert(_spec("oasst_trees.jsonl", "oasst")) if isinstance(c, Conversation)]
    docs = _renderer(llama3_tokenizer, template).render_batch(convs)
    batch = [[{"role": m.role, "content": m.text} for m in c.messages] for c in convs]
    refs = llama3_tokenizer.apply_chat_template(batch)["input_ids"]
    assert [d.input_ids.tolist() for d in docs] == refs


def test_openai_part_spellings_still_read():
    """The OpenAI spellings read before (chat and Responses API parts) still read beside LLaMA-Factory's `value`."""
    from mlan.sources import to_conversation

    spec = _spec("llamafactory_messages.jsonl", "messages", "image_text")
    record = {"messages": [
        {"role": "user", "content": [{"type": "input_text", "text": "a "}, {"type": "input_image", "image_url": "red.png"},
                                     {"type": "text", "text": "b "}, {"type": "image_url", "image_url": {"url": "red.png"}},
                                     {"text": "c"}]},
        {"role": "assistant", "content": [{"type": "output_text", "text": "two"}]}]}
    conv = to_conversation(spec, 0, record, str(spec.path))
    assert conv.messages[0].text == "a b c" and len(conv.images) == 2 and conv.messages[1].text == "two"
