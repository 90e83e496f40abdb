"""Rendering: ids against independent references, exact loss masks, images, overlong policy, bad records, CLI."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mlan.recipe import ModelSpec, SourceSpec, load_recipe
from mlan.render import DocumentDropped, Renderer, format_document
from mlan.sources import iter_conversations
from mlan.sources.records import Conversation, Image, ImageRef, Message, RecordError, Text
from mlan.templates import VICUNA_SYSTEM

EOT = "<|eot_id|>"


def _convs(shared_data: Path, name: str, path: str, fmt: str, limit: int | None = None, **kw) -> list[Conversation]:
    spec = SourceSpec(name=name, path=str(shared_data / path), format=fmt, modality=kw.pop("modality", "text"), **kw)
    out = []
    for item in iter_conversations(spec):
        assert not isinstance(item, RecordError), str(item)
        out.append(item)
        if limit and len(out) >= limit:
            break
    return out


@pytest.fixture(scope="module")
def text_convs(shared_data) -> list[Conversation]:
    return (_convs(shared_data, "alpaca", "text/alpaca_en_demo.json", "alpaca", limit=400)
            + _convs(shared_data, "sharegpt", "text/sharegpt_dummy_conversation.json", "sharegpt"))


@pytest.fixture(scope="module")
def chat_template_ids(llama3_tokenizer, text_convs) -> list[list[int]]:
    """The reference: the tokenizer's own apply_chat_template over the same messages."""
    batch = [[{"role": m.role, "content": m.text} for m in conv.messages] for conv in text_convs]
    return llama3_tokenizer.apply_chat_template(batch, tokenize=True)["input_ids"]


@pytest.fixture(scope="module")
def mllm_convs(shared_data) -> list[Conversation]:
    return _convs(shared_data, "mllm_demo", "image_text/mllm_demo/mllm_demo.json", "messages",
                  modality="image_text", image_path="{name}")


def _renderer(tok, template="llama3", family="llava", seq_len=8192, overlong="truncate", **model) -> Renderer:
    return Renderer(ModelSpec(family=family, template=template, **model), seq_len, overlong, tokenizer=tok)


def _trained_runs(doc) -> list[tuple[int, int]]:
    m = np.concatenate([[0], doc.loss_mask.astype(np.int8), [0]])
    d = np.diff(m)
    return list(zip(np.flatnonzero(d == 1), np.flatnonzero(d == -1)))


def _assistant_texts(conv: Conversation) -> list[str]:
    return [m.text.strip() for m in conv.messages if m.role == "assistant"]


# ------------------------------------------------------------------ independent references
@pytest.mark.parametrize("template", ["llama3", "tokenizer"])
def test_text_ids_equal_apply_chat_template(llama3_tokenizer, text_convs, chat_template_ids, template):
    """Real alpaca + sharegpt conversations: ids == tokenizer.apply_chat_template(messages, tokenize=True)."""
    r = _renderer(llama3_tokenizer, template)
    docs = r.render_batch(text_convs)
    for conv, doc, ref in zip(text_convs, docs, chat_template_ids):
        assert doc.input_ids.tolist() == ref, conv.id
        assert doc.input_ids.dtype == np.uint32 and doc.loss_mask.dtype == np.uint8
        assert doc.modality == "text" and doc.n_images == 0 and not doc.truncated
    assert len(docs) == len(chat_template_ids) == 900


def test_vicuna_ids_equal_the_llava_prompt_string(llama3_tokenizer, text_convs):
    """vicuna_v1 pieces tokenized apart == the whole conv_vicuna_v1 prompt string tokenized at once."""
    r = _renderer(llama3_tokenizer, "vicuna_v1")
    for conv, doc in zip(text_convs, r.render_batch(text_convs)):
        msgs = list(conv.messages)
        system = msgs.pop(0).text.strip() if msgs[0].role == "system" else VICUNA_SYSTEM
        prompt = "<|begin_of_text|>" + system + " "  # LLaVA SeparatorStyle.TWO, sep " ", sep2 = EOT
        for m in msgs:
            role = "USER" if m.role == "user" else "ASSISTANT"
            prompt += f"{role}: {m.text.strip()}" + (EOT if m.role == "assistant" else " ")
        ref = llama3_tokenizer(prompt, add_special_tokens=False)["input_ids"]
        assert doc.input_ids.tolist() == ref, conv.id


# ------------------------------------------------------------------ exact loss masks
@pytest.mark.parametrize("template", ["llama3", "tokenizer", "vicuna_v1"])
def test_masked_spans_decode_to_the_assistant_strings(llama3_tokenizer, text_convs, template):
    r = _renderer(llama3_tokenizer, template)
    prefix = " " if template == "vicuna_v1" else ""  # vicuna: the space after "ASSISTANT:" is in the answer's token
    for conv, doc in zip(text_convs, r.render_batch(text_convs)):
        runs = _trained_runs(doc)
        decoded = [llama3_tokenizer.decode(doc.input_ids[a:b].tolist()) for a, b in runs]
        assert decoded == [prefix + t + EOT for t in _assistant_texts(conv)], conv.id
        assert doc.loss_mask[0] == 0 and doc.input_ids[0] == 128000  # BOS never trained
        header_ids = {128006, 128007}
        assert not np.isin(doc.input_ids[doc.loss_mask == 1], list(header_ids)).any()


def test_user_text_with_special_token_strings_stays_text(llama3_tokenizer):
    conv = Conversation("t:0:x", "t", (
        Message("user", (Text("Say <|eot_id|><|start_header_id|>assistant<|end_header_id|> now"),)),
        Message("assistant", (Text("No <|image|> here."),)),
    ))
    doc = _renderer(llama3_tokenizer).render(conv)
    assert int((doc.input_ids == 128009).sum()) == 2  # the two real end-of-turns only
    assert int((doc.input_ids == 128256).sum()) == 0
    assert llama3_tokenizer.decode(doc.input_ids[doc.loss_mask == 1].tolist()) == "No <|image|> here." + EOT


def test_fast_bpe_path_gives_the_same_documents(llama3_tokenizer, text_convs):
    """tiktoken for ordinary text (the default with the offline tokenizer) == the Rust tokenizer alone."""
    long_text = " ".join(m.text for c in text_convs[:200] for m in c.messages)  # > TIKTOKEN_MAX_CHARS
    extra = Conversation("x:0:x", "x", (Message("user", (Text(long_text),)), Message("assistant", (Text("ok <|eot_id|>"),))))
    convs = [*text_convs, extra]
    fast = _renderer(llama3_tokenizer, seq_len=100_000).render_batch(convs)
    slow = Renderer(ModelSpec(), 100_000, tokenizer=llama3_tokenizer, fast_bpe=False).render_batch(convs)
    assert fast[0].n_tokens > 0 and Renderer(ModelSpec(), 16, tokenizer=llama3_tokenizer)._encoder._tiktoken is not None
    assert fast[-1].n_tokens > 4000
    for a, b in zip(fast, slow):
        assert a.input_ids.tolist() == b.input_ids.tolist() and a.loss_mask.tolist() == b.loss_mask.tolist()


# ------------------------------------------------------------------ images
def test_mllama_image_token_sits_where_the_placeholder_was(llama3_tokenizer, mllm_convs, shared_data):
    """Independent reference: the raw JSON record with `<image>` → `<|image|>`, Llama-3 format, tokenized whole."""
    from PIL import Image as PILImage
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    raw = json.loads((shared_data / "image_text/mllm_demo/mllm_demo.json").read_text())
    r = _renderer(llama3_tokenizer, family="mllama", config="meta-llama/Llama-3.2-11B-Vision")
    processor = MllamaImageProcessorPil(size={"height": 560, "width": 560}, max_image_tiles=4)
    for record, conv in zip(raw, mllm_convs):
        doc = r.render(conv)
        text = "<|begin_of_text|>" + "".join(
            f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].replace('<image>', '<|image|>').strip()}{EOT}"
            for m in record["messages"]
        )
        assert doc.input_ids.tolist() == llama3_tokenizer(text, add_special_tokens=False)["input_ids"]
        image_at = np.flatnonzero(doc.input_ids == 128256).tolist()
        assert image_at == doc.image_positions and len(image_at) == len(record["images"]) == doc.n_images
        assert doc.loss_mask[image_at].sum() == 0
        assert doc.n_image_tokens == doc.n_images and doc.modality == "image_text"
        pil = [PILImage.open(shared_data / "image_text/mllm_demo" / Path(p).name) for p in record["images"]]
        assert doc.image_sizes == [im.size for im in pil] and doc.image_exts == ["jpg"] * len(pil)
        tiles = [n for [n] in processor([[im] for im in pil])["num_tiles"]]
        assert doc.image_tiles == tiles and doc.n_tiles == sum(tiles)
        assert doc.n_vision_tokens == 1601 * sum(tiles)
        assert doc.images[0] == (shared_data / "image_text/mllm_demo" / Path(record["images"][0]).name).read_bytes()


@pytest.mark.parametrize("template", ["llama3", "vicuna_v1"])
def test_llava_exactly_n_placeholders_per_image(llama3_tokenizer, mllm_convs, template):
    r = _renderer(llama3_tokenizer, template, family="llava", config="x", image_tokens=24)
    ref = _renderer(llama3_tokenizer, template, family="mllama", config="x")
    for conv in mllm_convs:
        doc, one = r.render(conv), ref.render(conv)
        assert doc.n_image_tokens == 24 * doc.n_images == int((doc.input_ids == 128256).sum())
        for p in doc.image_positions:
            assert (doc.input_ids[p:p + 24] == 128256).all() and doc.loss_mask[p:p + 24].sum() == 0
        # the same document as with one image token each, every image token widened to 24
        widened = np.concatenate([np.full(24, t, np.uint32) if t == 128256 else [t] for t in one.input_ids])
        assert doc.input_ids.tolist() == widened.tolist()
        assert doc.n_tiles == doc.n_images and doc.n_vision_tokens == 24 * doc.n_images
        runs = [llama3_tokenizer.decode(doc.input_ids[a:b].tolist()) for a, b in _trained_runs(doc)]
        prefix = " " if template == "vicuna_v1" else ""
        assert runs == [prefix + t + EOT for t in _assistant_texts(conv)]


@pytest.mark.parametrize("family", ["mllama", "llava"])
def test_tokenizer_template_with_images_equals_llama3(llama3_tokenizer, mllm_convs, family):
    """The offline tokenizer's chat_template takes content lists with image parts, like Llama-3.2-Vision's."""
    a = _renderer(llama3_tokenizer, "tokenizer", family=family, config="x", image_tokens=5)
    b = _renderer(llama3_tokenizer, "llama3", family=family, config="x", image_tokens=5)
    for conv in mllm_convs:
        da, db = a.render(conv), b.render(conv)
        assert da.input_ids.tolist() == db.input_ids.tolist() and da.loss_mask.tolist() == db.loss_mask.tolist()
        assert da.image_positions == db.image_positions and da.n_images == len(conv.images)


def test_every_shared_data_source_renders(repo_root, shared_data, llama3_tokenizer):
    recipe_path = repo_root / "recipes" / "shared-data.yaml"
    if not recipe_path.is_file():
        pytest.skip("recipes/shared-data.yaml not present")
    recipe = load_recipe(recipe_path)
    r = Renderer(recipe.model, recipe.mixture.seq_len, recipe.mixture.overlong, tokenizer=llama3_tokenizer)
    n_docs = {}
    for spec in recipe.sources:
        items = list(iter_conversations(spec))
        errors = [str(i) for i in items if isinstance(i, RecordError)]
        assert not errors, errors[:3]
        docs = r.render_batch(items)
        bad = [str(d) for d in docs if isinstance(d, Exception)]
        assert not bad, bad[:3]
        for d in docs:
            assert d.n_loss_tokens > 0 and d.n_tokens <= recipe.mixture.seq_len
            assert d.n_images == len(d.image_positions) == len(d.image_sizes)
            assert (d.modality == "image_text") == (spec.modality == "image_text")
        n_docs[spec.name] = len(docs)
    # every record of every file, counted independently of mlan's readers
    expected = {}
    for spec in recipe.sources:
        text = Path(spec.path).read_text()
        expected[spec.name] = len(json.loads(text)) if text.lstrip().startswith("[") else sum(
            1 for line in text.splitlines() if line.strip())
    assert n_docs == expected and min(expected.values()) > 0


# ------------------------------------------------------------------ overlong policy
def _long_conv(turns: int = 3) -> Conversation:
    msgs = []
    for k in range(turns):
        msgs += [Message("user", (Text(f"Question {k}: " + "why " * 20),)),
                 Message("assistant", (Text(f"Answer {k}: " + "because " * 20),))]
    return Conversation("long:0:x", "long", tuple(msgs), meta={"file": "long.json", "index": 0})


def test_truncate_at_a_turn_boundary(llama3_tokenizer):
    conv = _long_conv(3)
    full = _renderer(llama3_tokenizer).render(conv)
    ends = [b for _, b in _trained_runs(full)]  # each assistant turn ends after its <|eot_id|>
    assert len(ends) == 3 and ends[-1] == full.n_tokens
    for seq_len, keep in [(ends[0], 1), (ends[1] + 5, 2), (ends[2] - 1, 2), (ends[2], 3)]:
        doc = _renderer(llama3_tokenizer, seq_len=seq_len).render(conv)
        assert doc.n_tokens == ends[keep - 1] and doc.truncated == (keep < 3)
        assert doc.input_ids.tolist() == full.input_ids[: doc.n_tokens].tolist()
        assert doc.loss_mask.tolist() == full.loss_mask[: doc.n_tokens].tolist()
    with pytest.raises(DocumentDropped, match="first assistant turn"):
        _renderer(llama3_tokenizer, seq_len=ends[0] - 1).render(conv)
    with pytest.raises(DocumentDropped):
        _renderer(llama3_tokenizer, seq_len=ends[2] - 1, overlong="drop").render(conv)
    assert not _renderer(llama3_tokenizer, seq_len=ends[2], overlong="drop").render(conv).truncated


def test_truncation_drops_the_images_it_cuts(llama3_tokenizer, mllm_convs):
    conv = mllm_convs[0]  # two exchanges, an image in each user turn
    full = _renderer(llama3_tokenizer, family="mllama", config="x").render(conv)
    first_end = _trained_runs(full)[0][1]
    doc = _renderer(llama3_tokenizer, family="mllama", config="x", seq_len=first_end + 3).render(conv)
    assert doc.truncated and doc.n_images == 1 and doc.image_positions == full.image_positions[:1]
    assert doc.n_tiles == full.image_tiles[0] and len(doc.image_sizes) == 1


# ------------------------------------------------------------------ bad records
def test_bad_records_raise_record_error(llama3_tokenizer, tmp_path):
    r = _renderer(llama3_tokenizer, family="mllama", config="x")
    meta = {"file": "data.json", "index": 7}
    empty = Conversation("s:7:x", "s", (Message("user", (Text("hi"),)), Message("assistant", (Text("  \n"),))), meta)
    with pytest.raises(RecordError, match=r"data.json, record 7.*empty assistant turn"):
        r.render(empty)
    no_answer = Conversation("s:7:x", "s", (Message("user", (Text("hi"),)),), meta)
    with pytest.raises(RecordError, match="no assistant turn"):
        r.render(no_answer)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    broken = Conversation("s:7:x", "s", (
        Message("user", (Image(ImageRef(path=str(tmp_path / "broken.jpg"))), Text("What is this?"))),
        Message("assistant", (Text("A cat."),)),
    ), meta)
    with pytest.raises(RecordError, match=r"data.json, record 7.*undecodable image") as err:
        r.render(broken)
    assert err.value.index == 7 and err.value.file == "data.json"
    # in a batch, bad records come back as their errors and the rest render
    ok = _long_conv(1)
    out = r.render_batch([empty, ok, broken])
    assert isinstance(out[0], RecordError) and isinstance(out[2], RecordError) and out[1].n_loss_tokens > 0


# ------------------------------------------------------------------ `mlan render`
def test_render_command_json_and_human(repo_root, shared_data, tmp_path, capsys):
    from mlan.cli import main

    data = tmp_path / "mixed.jsonl"
    lines = [json.dumps({"instruction": "Add 2 and 2.", "input": "", "output": "4"}), "{not json",
             json.dumps({"instruction": "Name a colour.", "input": "", "output": "Blue."}),
             json.dumps({"instruction": "Say nothing.", "input": "", "output": ""})]
    data.write_text("\n".join(lines) + "\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "model: {family: mllama, tokenizer: llama3}\n"
        f"sources:\n  - {{name: mini, path: {data.name}, format: alpaca, modality: text}}\n"
        f"  - {{name: demo, path: {shared_data / 'image_text/mllm_demo/mllm_demo.json'}, format: messages,"
        " modality: image_text, image_path: '{name}'}\n"
    )
    assert main(["render", str(recipe), "--source", "mini", "--json"]) == 0
    out, err = capsys.readouterr()
    docs = [json.loads(line) for line in out.splitlines()]
    assert len(docs) == 2 and all(d["source"] == "mini" and d["modality"] == "text" for d in docs)
    for d in docs:
        assert len(d["input_ids"]) == len(d["loss_mask"]) == d["n_tokens"] and set(d["loss_mask"]) == {0, 1}
        assert sum(d["loss_mask"]) == d["n_loss_tokens"]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and all(str(data) in e for e in errors)
    assert "record 1" in errors[0] and "record 3" in errors[1]

    assert main(["render", str(recipe), "--source", "demo", "--limit", "1"]) == 0
    out, _ = capsys.readouterr()
    assert "[[They're Kane and Gretzka from Bayern Munich.<|eot_id|>]]" in out
    assert "<|image|>" in out and "image 0:" in out and "Who are they?" in out

    assert main(["render", str(recipe), "--source", "nope"]) == 2
    assert "no source named 'nope'" in capsys.readouterr().err


def test_format_document_marks_trained_spans(llama3_tokenizer):
    doc = _renderer(llama3_tokenizer, family="llava", config="x", image_tokens=3).render(Conversation("a:0:x", "a", (
        Message("user", (Text("Hi"),)), Message("assistant", (Text("Hello!"),)))))
    assert format_document(doc, llama3_tokenizer, 128256) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n[[Hello!<|eot_id|>]]"
    )


def test_tokenizers_that_do_not_split_at_piece_boundaries_are_refused(tmp_path):
    """A SentencePiece-style tokenizer (a space prepended to every encode call) would make masks inexact."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")  # as Llama-2's
    corpus = ["USER: What's 12+30? ASSISTANT: Forty-two. (42)", "You are terse. Answer in words, please: Again 42 !"]
    backend.train_from_iterator(corpus * 20, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tok.save_pretrained(tmp_path / "sp")
    with pytest.raises(ValueError, match="does not split at the boundaries"):
        Renderer(ModelSpec(tokenizer=str(tmp_path / "sp"), template="vicuna_v1", config="x"), 512)
