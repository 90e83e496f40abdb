"""Instruction sources → Conversation records: every format, every reader, and a per-record error for each bad input."""
from __future__ import annotations

import base64
import collections
import gzip
import hashlib
import io
import json
import os
import struct
from pathlib import Path

import pytest
from PIL import Image as PILImage

from mlan.recipe import SourceSpec, TemplateSpec, load_recipe
from mlan.sources import (
    Conversation,
    Image,
    RecordError,
    SourceError,
    Text,
    choose_prompt,
    iter_conversations,
    probe_image,
    read_records,
    to_conversation,
)
from mlan.sources.readers import source_kind

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "shared-data.yaml"


# ---------------------------------------------------------------- helpers
def png_bytes(w: int = 7, h: int = 5, color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    PILImage.new("RGB", (w, h), color).save(buf, format="PNG")
    return buf.getvalue()


def write_png(path: Path, w: int = 7, h: int = 5) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(w, h))
    return path


def write_jsonl(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def spec(path: Path | str, fmt: str, modality: str = "text", **kw) -> SourceSpec:
    return SourceSpec(name=kw.pop("name", "src"), path=str(path), format=fmt, modality=modality, **kw)


def convert_all(s: SourceSpec) -> list[Conversation | RecordError]:
    return list(iter_conversations(s))


def roles_and_text(conv: Conversation) -> list[tuple[str, str]]:
    return [(m.role, m.text) for m in conv.messages]


def parts(conv: Conversation, i: int) -> list:
    """A message's parts as ('text', str) / ('image', path-or-bytes)."""
    return [("text", p.text) if isinstance(p, Text) else ("image", p.ref.path or p.ref.data) for p in conv.messages[i].parts]


def count_records(path: Path) -> int:
    """Independent count: a JSON array's length, else the non-blank lines."""
    text = path.read_text()
    if text.lstrip().startswith("["):
        return len(json.loads(text))
    return sum(1 for line in text.splitlines() if line.strip())


# ---------------------------------------------------------------- the real data of recipes/shared-data.yaml
def test_shared_data_recipe_sources_convert_every_record(shared_data: Path) -> None:
    recipe = load_recipe(RECIPE)
    assert [s.name for s in recipe.sources] == ["alpaca", "sharegpt", "gsm8k", "mllm_demo", "nlvr"]
    assert recipe.model.family == "llava" and recipe.model.tokenizer == "llama3"
    for s in recipe.sources:
        out = convert_all(s)
        errors = [str(e) for e in out if isinstance(e, RecordError)]
        assert errors == [], f"{s.name}: {errors[:3]}"
        assert len(out) == count_records(Path(s.path)), s.name
        assert {c.modality for c in out} == {s.modality}, s.name
        assert len({c.id for c in out}) == len(out), f"{s.name}: ids not unique"
        for c in out:
            assert c.source == s.name and c.messages[-1].role == "assistant" and c.messages[-1].text.strip()


def test_shared_data_contents_match_the_files(shared_data: Path) -> None:
    recipe = load_recipe(RECIPE)
    alpaca = json.loads((shared_data / "text/alpaca_en_demo.json").read_text())
    convs = convert_all(recipe.source("alpaca"))
    for rec, conv in zip(alpaca, convs):
        user = rec["instruction"] + ("\n" + rec["input"] if rec["input"] else "")
        assert roles_and_text(conv) == [("user", user), ("assistant", rec["output"])]

    gsm = [json.loads(line) for line in (shared_data / "text/gsm8k_train.jsonl").read_text().splitlines()]
    convs = convert_all(recipe.source("gsm8k"))
    for rec, conv in zip(gsm, convs):
        assert conv.messages[1].text == rec["answer"] and rec["question"] in conv.messages[0].text

    demo = json.loads((shared_data / "image_text/mllm_demo/mllm_demo.json").read_text())
    convs = convert_all(recipe.source("mllm_demo"))
    for rec, conv in zip(demo, convs):
        want = [str(shared_data / "image_text/mllm_demo" / Path(p).name) for p in rec["images"]]
        assert [r.path for r in conv.images] == want
        assert [m.text for m in conv.messages] == [m["content"].replace("<image>", "") for m in rec["messages"]]

    nlvr = [json.loads(line) for line in (shared_data / "image_text/nlvr_dev/dev.json").read_text().splitlines()]
    convs = convert_all(recipe.source("nlvr"))
    root = shared_data / "image_text/nlvr_dev/images"
    for rec, conv in zip(nlvr, convs):
        (ref,) = conv.images
        assert ref.path == str(root / rec["directory"] / f"dev-{rec['identifier']}-0.png")
        assert isinstance(conv.messages[0].parts[0], Image)  # at the start of the user turn
        assert rec["sentence"] in conv.messages[0].text and conv.messages[1].text.endswith(f"direct answer is: {rec['label']}")


def _png_header_size(path: Path) -> tuple[int, int]:
    """Independent reference: a PNG's IHDR chunk holds width and height big-endian at bytes 16..24."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def test_probe_image_reads_real_headers(shared_data: Path) -> None:
    recipe = load_recipe(RECIPE)
    for conv in convert_all(recipe.source("nlvr"))[:20]:
        (ref,) = conv.images
        assert probe_image(ref, "dev.json", 0) == (*_png_header_size(Path(ref.path)), "png")
    conv = convert_all(recipe.source("mllm_demo"))[0]
    w, h, ext = probe_image(conv.images[0], "mllm_demo.json", 0)
    assert ext == "jpg" and w > 0 and h > 0


# ---------------------------------------------------------------- formats on inline fixtures
def test_alpaca_instruction_input_system_history(tmp_path: Path) -> None:
    f = write_jsonl(tmp_path / "a.jsonl", [
        {"instruction": "Add.", "input": "2 and 3", "output": "5", "system": "Be terse.",
         "history": [["hi", "hello"], ["who?", "me"]]},
        {"instruction": "Say hi.", "input": "", "output": "hi"},
    ])
    a, b = convert_all(spec(f, "alpaca"))
    assert roles_and_text(a) == [("system", "Be terse."), ("user", "hi"), ("assistant", "hello"), ("user", "who?"),
                                 ("assistant", "me"), ("user", "Add.\n2 and 3"), ("assistant", "5")]
    assert roles_and_text(b) == [("user", "Say hi."), ("assistant", "hi")]


def test_sharegpt_roles_multi_turn_and_aliases(tmp_path: Path) -> None:
    f = tmp_path / "s.json"
    f.write_text(json.dumps([
        {"system": "sys", "conversations": [{"from": "human", "value": "q1"}, {"from": "gpt", "value": "a1"},
                                            {"from": "user", "value": "q2"}, {"from": "chatgpt", "value": "a2"}]},
        {"messages": [{"from": "system", "value": "s"}, {"from": "human", "value": "q"}, {"from": "assistant", "value": "a"}]},
    ]))
    a, b = convert_all(spec(f, "sharegpt"))
    assert roles_and_text(a) == [("system", "sys"), ("user", "q1"), ("assistant", "a1"), ("user", "q2"), ("assistant", "a2")]
    assert roles_and_text(b) == [("system", "s"), ("user", "q"), ("assistant", "a")]


def test_llava_placeholders_image_and_images(tmp_path: Path) -> None:
    img1, img2 = write_png(tmp_path / "imgs/a.png"), write_png(tmp_path / "imgs/sub/b.png")
    f = write_jsonl(tmp_path / "l.jsonl", [
        {"image": "imgs/a.png", "conversations": [{"from": "human", "value": "What is <image> this?"},
                                                  {"from": "gpt", "value": "red"}]},
        {"images": ["imgs/a.png", "imgs/sub/b.png"], "conversations": [
            {"from": "human", "value": "<image>\nfirst"}, {"from": "gpt", "value": "ok"},
            {"from": "human", "value": "second <image>"}, {"from": "gpt", "value": "ok2"}]},
        {"image": "imgs/a.png", "conversations": [{"from": "human", "value": "no placeholder"}, {"from": "gpt", "value": "x"}]},
        {"conversations": [{"from": "human", "value": "text only"}, {"from": "gpt", "value": "y"}]},
    ])
    a, b, c, d = convert_all(spec(f, "llava", "image_text"))
    assert parts(a, 0) == [("text", "What is "), ("image", str(img1)), ("text", " this?")]
    assert parts(b, 0) == [("image", str(img1)), ("text", "\nfirst")] and parts(b, 2) == [("text", "second "), ("image", str(img2))]
    assert parts(c, 0) == [("image", str(img1)), ("text", "no placeholder")]  # LLaVA: no placeholder → first user turn
    assert d.modality == "text" and c.modality == "image_text"


def test_messages_openai_parts_data_urls_and_llamafactory(tmp_path: Path) -> None:
    img = write_png(tmp_path / "pics/p.png")
    raw = png_bytes(3, 4)
    url = "data:image/png;base64," + base64.b64encode(raw).decode()
    f = write_jsonl(tmp_path / "m.jsonl", [
        {"messages": [{"role": "system", "content": "sys"},
                      {"role": "user", "content": [{"type": "text", "text": "look "},
                                                   {"type": "image_url", "image_url": {"url": url}},
                                                   {"type": "image", "image": "pics/p.png"}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "two images"}]}]},
        # LLaMA-Factory: <image> placeholders in text + top-level images, paths renamed on disk ({name})
        {"messages": [{"role": "user", "content": "<image>Who?"}, {"role": "assistant", "content": "him"}],
         "images": ["old_folder_name/p.png"]},
        # processor style: bare {"type": "image"} parts take the record's images in order
        {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and?"}]},
                      {"role": "assistant", "content": "it"}], "images": ["pics/p.png"]},
    ])
    a, b, c = convert_all(spec(f, "messages", "image_text", image_path="pics/{name}"))
    assert parts(a, 1) == [("text", "look "), ("image", raw), ("image", str(img))]
    assert roles_and_text(a) == [("system", "sys"), ("user", "look "), ("assistant", "two images")]
    assert parts(b, 0) == [("image", str(img)), ("text", "Who?")]
    assert parts(c, 0) == [("image", str(img)), ("text", "and?")]
    assert probe_image(a.images[0], "m.jsonl", 0) == (3, 4, "png")


def test_prompt_completion_strings_and_message_lists(tmp_path: Path) -> None:
    f = write_jsonl(tmp_path / "pc.jsonl", [
        {"prompt": "2+2=", "completion": "4"},
        {"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}],
         "completion": [{"role": "assistant", "content": "hello"}]},
    ])
    a, b = convert_all(spec(f, "prompt_completion"))
    assert roles_and_text(a) == [("user", "2+2="), ("assistant", "4")]
    assert roles_and_text(b) == [("system", "s"), ("user", "hi"), ("assistant", "hello")]


@pytest.mark.parametrize("engine, prompt, response", [
    ("format", "Q: {q} ({meta[k]})", "A: {a}"),
    ("jinja", "Q: {{ q }} ({{ meta.k }})", "A: {{ a }}"),
])
def test_template_engines_and_image_template(tmp_path: Path, engine: str, prompt: str, response: str) -> None:
    img = write_png(tmp_path / "root/images/3/x-7.png")
    f = write_jsonl(tmp_path / "t.jsonl", [{"q": "why", "a": "because", "meta": {"k": "v"}, "d": "3", "id": 7}])
    tmpl_image = "images/{d}/x-{id}.png" if engine == "format" else "images/{{ d }}/x-{{ id }}.png"
    s = spec(f, "template", "image_text", images=str(tmp_path / "root"),
             template=TemplateSpec(prompts=[prompt], response=response, system="sys", image=tmpl_image, engine=engine))
    (c,) = convert_all(s)
    assert roles_and_text(c) == [("system", "sys"), ("user", "Q: why (v)"), ("assistant", "A: because")]
    assert parts(c, 1)[0] == ("image", str(img))  # no <image> in the prompt → the start of the user turn
    # with a placeholder the image goes where it stands
    s2 = s.model_copy(update={"template": s.template.model_copy(update={"prompts": [prompt + " <image>"]})})
    (c2,) = convert_all(s2)
    assert parts(c2, 1) == [("text", "Q: why (v) "), ("image", str(img))]


def test_template_choice_is_deterministic_and_spreads(shared_data: Path) -> None:
    recipe = load_recipe(RECIPE)
    gsm = recipe.source("gsm8k")
    first = [c.meta["prompt"] for c in convert_all(gsm)]
    assert first == [c.meta["prompt"] for c in convert_all(gsm)]  # stable across runs
    counts = collections.Counter(first)
    n, k = len(first), len(gsm.template.prompts)
    assert set(counts) == set(range(k)) and all(0.8 * n / k < v < 1.2 * n / k for v in counts.values()), counts
    reseeded = gsm.model_copy(update={"template": gsm.template.model_copy(update={"seed": 1})})
    second = [c.meta["prompt"] for c in convert_all(reseeded.model_copy(update={"limit": 500}))]
    assert sum(x != y for x, y in zip(first, second)) > 500 * (1 - 1 / k) * 0.7  # the seed reshuffles choices
    # the choice depends on the record's content, not on key order or position
    rec = {"question": "q", "answer": "a"}
    assert choose_prompt(json.dumps(rec, sort_keys=True, separators=(",", ":")), 0, k) == \
        to_conversation(gsm, 99, dict(reversed(list(rec.items()))), "x").meta["prompt"]


def test_conversation_id_is_source_index_and_content_hash(tmp_path: Path) -> None:
    rec = {"output": "ü", "instruction": "i", "input": ""}
    f = write_jsonl(tmp_path / "a.jsonl", [rec])
    (c,) = convert_all(spec(f, "alpaca", name="mine"))
    canon = json.dumps(rec, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert c.id == f"mine:0:{hashlib.sha256(canon.encode()).hexdigest()[:12]}"


# ---------------------------------------------------------------- readers
def test_json_sniffing_folders_compression_urls_and_limit(tmp_path: Path) -> None:
    good = lambda i: {"instruction": f"q{i}", "input": "", "output": f"a{i}"}
    folder = tmp_path / "data"
    (folder / "b").mkdir(parents=True)
    (folder / "a.json").write_text(json.dumps([good(0), good(1)]))  # a JSON array
    write_jsonl(folder / "b" / "c.json", [good(2), good(3)])  # JSON lines under a .json name
    with gzip.open(folder / "b" / "d.jsonl.gz", "wt") as fh:
        fh.write(json.dumps(good(4)) + "\n\n" + json.dumps(good(5)) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([good(6), good(7)]), folder / "e.parquet")
    (folder / "notes.txt").write_text("not data")
    (folder / ".hidden.jsonl").write_text("{broken")
    want = [f"q{i}" for i in range(8)]  # a.json, b/c.json, b/d.jsonl.gz, e.parquet in sorted path order
    assert [r["instruction"] for _, r in read_records(spec(folder, "alpaca"))] == want
    assert [i for i, _ in read_records(spec(folder, "alpaca"))] == list(range(8))
    assert [r["instruction"] for _, r in read_records(spec(f"file://{folder}", "alpaca"))] == want
    assert [i for i, _ in read_records(spec(folder, "alpaca", limit=3))] == [0, 1, 2]
    files = [c.meta["file"] for c in convert_all(spec(folder, "alpaca"))]
    assert files[2].endswith("b/c.json") and files[6].endswith("e.parquet")
    with pytest.raises(SourceError, match="not found"):
        list(read_records(spec(tmp_path / "nope.jsonl", "alpaca")))
    assert source_kind("some-org/some-dataset") == "hub" and source_kind(str(folder)) == "files"
    # a broken JSON array is one error for its file (no record index); the other files still come out
    (folder / "b" / "bad.json").write_text('[{"instruction": "x", ')
    out = list(read_records(spec(folder, "alpaca")))
    (err,) = [r for _, r in out if isinstance(r, RecordError)]
    assert err.index is None and "bad.json" in str(err) and "malformed JSON array" in str(err)
    assert [r["instruction"] for _, r in out if not isinstance(r, RecordError)] == want


def _bytes_of(ref) -> bytes:
    return ref.read_bytes()


def test_saved_dataset_folder_with_image_feature(tmp_path: Path) -> None:
    import datasets

    raw = [png_bytes(4, 4, (i * 40, 0, 0)) for i in range(3)]
    ds = datasets.Dataset.from_dict(
        {"question": ["a", "b", "c"], "answer": ["x", "y", "z"], "image": [{"bytes": b, "path": None} for b in raw]},
        features=datasets.Features({"question": datasets.Value("string"), "answer": datasets.Value("string"),
                                    "image": datasets.Image()}))
    datasets.DatasetDict({"train": ds, "test": ds.select([2])}).save_to_disk(str(tmp_path / "saved"))
    tmpl = TemplateSpec(prompts=["<image>{question}"], response="{answer}")
    convs = convert_all(spec(tmp_path / "saved", "template", "image_text", template=tmpl))
    assert [c.messages[1].text for c in convs] == ["x", "y", "z"]
    assert [_bytes_of(c.images[0]) for c in convs] == raw  # the stored encoding, not a re-encode
    (only,) = convert_all(spec(tmp_path / "saved", "template", "image_text", template=tmpl, split="test"))
    assert only.messages[1].text == "z"
    with pytest.raises(SourceError, match="no split 'dev'"):
        convert_all(spec(tmp_path / "saved", "template", "image_text", template=tmpl, split="dev"))


def test_load_dataset_path_over_local_files_with_image_feature(tmp_path: Path) -> None:
    """The Hugging Face id path (`datasets.load_dataset(..., streaming=True)`), exercised offline on local folders."""
    import datasets

    write_jsonl(tmp_path / "hub_like/train.jsonl", [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(4)])
    convs = convert_all(spec(f"hf:{tmp_path / 'hub_like'}", "prompt_completion"))
    assert [roles_and_text(c) for c in convs] == [[("user", f"p{i}"), ("assistant", f"c{i}")] for i in range(4)]

    raw = [png_bytes(5, 3, (0, i * 50, 0)) for i in range(2)]
    ds = datasets.Dataset.from_dict(
        {"messages": [[{"role": "user", "content": "<image>what"}, {"role": "assistant", "content": f"img{i}"}]
                      for i in range(2)],
         "images": [[{"bytes": b, "path": None}] for b in raw]},
        features=datasets.Features({"messages": [{"role": datasets.Value("string"), "content": datasets.Value("string")}],
                                    "images": datasets.Sequence(datasets.Image())}))
    (tmp_path / "pq_ds/data").mkdir(parents=True)
    ds.to_parquet(str(tmp_path / "pq_ds/data/train-00000-of-00001.parquet"))
    s = spec(f"hf:{tmp_path / 'pq_ds'}", "messages", "image_text")
    convs = convert_all(s)
    assert [c.messages[1].text for c in convs] == ["img0", "img1"]
    assert [_bytes_of(c.images[0]) for c in convs] == raw
    # the same parquet read directly by the parquet reader gives the same conversations
    direct = convert_all(spec(tmp_path / "pq_ds", "messages", "image_text"))
    assert [c.messages for c in direct] == [c.messages for c in convs]


# ---------------------------------------------------------------- bad input: one RecordError per record, the read goes on
GOOD = {
    "alpaca": {"instruction": "i", "input": "", "output": "o"},
    "sharegpt": {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
    "llava": {"image": "ok.png", "conversations": [{"from": "human", "value": "<image>q"}, {"from": "gpt", "value": "a"}]},
    "messages": {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
    "template": {"q": "x", "a": "y"},
}


def _llava(path: str, text: str = "<image>q") -> dict:
    return {"image": path, "conversations": [{"from": "human", "value": text}, {"from": "gpt", "value": "a"}]}


BAD = [  # (format, bad record or raw line, reason in the message, field)
    ("alpaca", "{\"instruction\": \"i\", \"output\": ", "malformed JSON on line 2", None),
    ("alpaca", {"instruction": "i", "input": ""}, "missing field", "output"),
    ("alpaca", {"instruction": "i", "output": "   "}, "empty assistant turn", "output"),
    ("sharegpt", {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"},
                                    {"from": "robot", "value": "?"}]}, "unknown role 'robot'", "conversations[2].from"),
    ("sharegpt", {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": ""}]},
     "empty assistant turn", "conversations[1].value"),
    ("sharegpt", {"conversations": [{"from": "human", "value": "q"}]}, "no assistant turn", None),
    ("sharegpt", {"id": 3}, "missing field", "conversations"),
    ("messages", {"messages": [{"role": "robot", "content": "q"}, {"role": "assistant", "content": "a"}]},
     "unknown role 'robot'", "messages[0].role"),
    ("messages", {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]},
     "empty assistant turn", "messages[1].content"),
    ("messages", {"messages": [{"role": "user", "content": "<image><image>q"}, {"role": "assistant", "content": "a"}],
                  "images": ["ok.png"]}, "2 <image> placeholder(s) but 1 image(s)", "images"),
    ("llava", _llava("../outside.png"), "outside the image root", "image"),
    ("llava", _llava("/etc/hostname"), "outside the image root", "image"),
    ("llava", _llava("escape.png"), "link that escapes the image root", "image"),
    ("llava", _llava("missing.png"), "image file not found", "image"),
    ("llava", _llava("ok.png", "q"), None, None),  # no placeholder: LLaVA puts the image first — not an error
    ("alpaca", {"instruction": "i", "output": "o", "images": ["ok.png"]}, "images but the source has modality: text",
     "images[0]"),
    ("template", {"q": "x"}, "needs field 'a', missing from the record", "a"),
    ("template", {"q": "x", "a": None}, "needs field 'a', null in the record", "a"),
]


@pytest.mark.parametrize("fmt, bad, reason, field", BAD, ids=[f"{b[0]}-{b[2]}" for b in BAD])
def test_bad_record_is_a_record_error_and_the_read_goes_on(tmp_path: Path, fmt, bad, reason, field) -> None:
    root = tmp_path / "root"
    write_png(root / "ok.png")
    write_png(tmp_path / "outside.png")
    os.symlink(tmp_path / "outside.png", root / "escape.png")
    os.symlink(root / "ok.png", root / "inner_link.png")
    f = write_jsonl(root / "data.jsonl", [GOOD[fmt], bad, GOOD[fmt]])
    kw = {"template": TemplateSpec(prompts=["{q}"], response="{a}")} if fmt == "template" else {}
    out = convert_all(spec(f, fmt, "image_text" if fmt in ("llava", "messages") else "text", **kw))
    assert len(out) == 3 and isinstance(out[0], Conversation) and isinstance(out[2], Conversation)
    assert out[2].meta["index"] == 2  # indices stay those of the source
    if reason is None:
        assert isinstance(out[1], Conversation)
        return
    err = out[1]
    assert isinstance(err, RecordError), err
    assert str(f) in str(err) and "record 1" in str(err) and reason in str(err), str(err)
    assert err.index == 1 and err.field == field and err.to_json()["reason"] == err.reason
    # a link that stays inside the root is fine
    ok = convert_all(spec(write_jsonl(root / "ok.jsonl", [_llava("inner_link.png")]), "llava", "image_text"))
    assert isinstance(ok[0], Conversation)


def test_bom_and_single_object_json(tmp_path: Path) -> None:
    rec = {"instruction": "i", "input": "", "output": "o"}
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps([rec, rec]).encode())
    (tmp_path / "one.json").write_text(json.dumps(rec, indent=2))
    assert [r for _, r in read_records(spec(tmp_path / "bom.json", "alpaca"))] == [rec, rec]
    assert [r for _, r in read_records(spec(tmp_path / "one.json", "alpaca"))] == [rec]


def test_record_error_pickles_for_ray_workers() -> None:
    import pickle

    err = pickle.loads(pickle.dumps(RecordError("f.jsonl", 3, "empty assistant turn", "output")))
    assert (err.file, err.index, err.reason, err.field) == ("f.jsonl", 3, "empty assistant turn", "output")
    assert str(err) == "f.jsonl, record 3 (field 'output'): empty assistant turn"


def test_malformed_json_line_in_read_records(tmp_path: Path) -> None:
    f = tmp_path / "d.json"  # JSON lines with a .json name, one broken line in the middle
    f.write_text('{"a": 1}\n{"a": \n{"a": 3}\n')
    out = list(read_records(spec(f, "alpaca")))
    assert out[0] == (0, {"a": 1}) and out[2] == (2, {"a": 3})
    assert isinstance(out[1][1], RecordError) and out[1][0] == 1 and "malformed JSON on line 2" in str(out[1][1])


def test_probe_image_rejects_undecodable_and_missing(tmp_path: Path) -> None:
    from mlan.sources import ImageRef

    bad = tmp_path / "bad.png"
    bad.write_bytes(png_bytes()[:40])  # a PNG cut short
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"not an image at all")
    for ref in (ImageRef(path=str(bad)), ImageRef(path=str(junk)), ImageRef(data=b"\x00" * 10),
                ImageRef(path=str(tmp_path / "gone.png"))):
        with pytest.raises(RecordError, match=r"f\.jsonl, record 4 \(field 'image'\): undecodable image"):
            probe_image(ref, "f.jsonl", 4)
    assert probe_image(ImageRef(path=str(write_png(tmp_path / "fine.png", 9, 2))), "f.jsonl", 4) == (9, 2, "png")
