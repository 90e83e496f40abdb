"""Issue #22 item 7: property-based tests that look for the next hostile input.

- format readers: arbitrary JSON values as records, arbitrary bytes as files → a Conversation (rendered
  to a Document or refused with a RecordError / DocumentDropped) or a RecordError, never another exception;
- recipes: valid recipes with mutated keys and values, and arbitrary text → a Recipe or one MlanError line;
- the CLI: argument lists for cheap commands (render, verify, inspect) → exit 0/1/2, never a traceback.

Derandomized (a fixed sequence of examples, the same in CI) with small `max_examples` so each test takes
seconds; no example database is written.
"""
from __future__ import annotations

import gzip
import io
import json
import tempfile
from functools import lru_cache
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlan.errors import MlanError

FUZZ = settings(derandomize=True, database=None, deadline=None, max_examples=150,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

KEYS = ["instruction", "input", "output", "system", "history", "conversations", "messages", "from", "value",
        "role", "content", "prompt", "completion", "images", "image", "tools", "tool_calls", "text", "type",
        "image_url", "url", "name", "arguments", "replies", "rank", "deleted", "message_id", "q", "a", "id",
        "loss_weight", "chosen", "function", "parameters", "path", "bytes"]
ROLES = ["user", "assistant", "system", "tool", "human", "gpt", "prompter", "function_call", "observation", "x"]

# text, sometimes with a lone surrogate in it (JSON's "\ud800" decodes to one; Hypothesis never draws them)
any_text = st.text(max_size=30) | st.builds(lambda a, c, b: a + chr(c) + b, st.text(max_size=10),
                                            st.integers(0xD800, 0xDFFF), st.text(max_size=10))
scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
           | st.floats(allow_nan=True, allow_infinity=True)
           | any_text | st.sampled_from(ROLES + ["<image>", "\x00", "\ud800", "data:image/png;base64,xx"]))
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), inner, max_size=5),
    max_leaves=25,
)
# records shaped like the formats' own, so the converters get past their first check
turn = st.fixed_dictionaries({}, optional={k: json_values | st.sampled_from(ROLES) for k in
                                           ("role", "content", "from", "value", "text", "tool_calls", "loss_weight")})
records = st.one_of(
    json_values,
    st.fixed_dictionaries({"instruction": any_text, "output": any_text, "input": any_text}),
    st.fixed_dictionaries({"messages": st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(ROLES), "content": any_text}), min_size=1, max_size=4)}),
    st.dictionaries(st.sampled_from(KEYS), json_values, max_size=6),
    st.fixed_dictionaries({"instruction": json_values, "output": json_values},
                          optional={"input": json_values, "images": json_values, "history": json_values}),
    st.fixed_dictionaries({"conversations": st.lists(turn, max_size=5)}, optional={"images": json_values}),
    st.fixed_dictionaries({"messages": st.lists(turn, max_size=5)},
                          optional={"images": json_values, "tools": json_values}),
    st.fixed_dictionaries({"prompt": json_values, "completion": json_values}),
    st.fixed_dictionaries({"text": json_values, "role": st.sampled_from(ROLES), "replies": json_values}),
)
FORMATS = ["alpaca", "sharegpt", "llava", "messages", "prompt_completion", "template", "oasst"]


def _spec(fmt: str, path: str = "/nonexistent/f.jsonl", modality: str = "text"):
    from mlan.recipe import SourceSpec

    extra = {"template": {"prompts": ["{q} {instruction}"], "response": "{a}"}} if fmt == "template" else {}
    return SourceSpec(name="s", path=path, format=fmt, modality=modality, **extra)


@lru_cache(maxsize=1)
def _renderer():
    from mlan.recipe import ModelSpec
    from mlan.render import Renderer

    return Renderer(ModelSpec(image_tokens=8), 128, "truncate")


def _convert_and_render(spec, index: int, record, file: str) -> None:
    """The build's path for one record: only RecordError (or a dropped document) may come out."""
    from mlan.render import DocumentDropped
    from mlan.sources import RecordError, to_conversations

    try:
        convs = to_conversations(spec, index, record, file)
    except RecordError as err:
        assert err.reason and err.file == file
        return
    for out in _renderer().render_batch(convs):
        assert isinstance(out, (RecordError, DocumentDropped)) or out.n_tokens > 0


@pytest.mark.timeout(120)
@FUZZ
@given(fmt=st.sampled_from(FORMATS), modality=st.sampled_from(["text", "image_text"]), record=records)
def test_any_json_record_is_converted_or_rejected(fmt, modality, record):
    _convert_and_render(_spec(fmt, modality=modality), 0, record, "f.jsonl")


def _parquet_bytes(rows: list) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()


line_texts = st.lists(st.one_of(records.map(lambda r: json.dumps(r, allow_nan=True)), st.text(max_size=40)),
                      max_size=6).map(lambda lines: "\n".join(lines).encode("utf-8", "surrogatepass"))
files = st.one_of(
    st.tuples(st.sampled_from([".jsonl", ".json", ".jsonl.gz", ".parquet", ".json.gz"]), st.binary(max_size=600)),
    st.tuples(st.sampled_from([".jsonl", ".json"]), line_texts),
    st.tuples(st.just(".json"), st.lists(records, max_size=4).map(
        lambda rs: json.dumps(rs).encode("utf-8", "surrogatepass"))),
    st.tuples(st.just(".jsonl.gz"), st.tuples(line_texts, st.floats(0, 1)).map(
        lambda t: gzip.compress(t[0])[: max(1, int(len(gzip.compress(t[0])) * t[1]))])),
    st.tuples(st.just(".parquet"), st.tuples(
        st.lists(st.fixed_dictionaries({"instruction": st.text(max_size=20), "output": st.text(max_size=20)}),
                 min_size=1, max_size=5), st.floats(0, 1)).map(
        lambda t: _parquet_bytes(t[0])[: max(1, int(len(_parquet_bytes(t[0])) * t[1]))])),
)


@pytest.mark.timeout(120)
@FUZZ
@given(fmt=st.sampled_from(FORMATS), file=files)
def test_any_file_is_read_or_rejected_with_a_reason(fmt, file):
    from mlan.sources.readers import RawLine, iter_source
    from mlan.sources.records import RecordError

    suffix, data = file
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"data{suffix}"
        path.write_bytes(data)
        spec = _spec(fmt, str(path))
        for name, index, record in iter_source(spec, raw_lines=True):
            if isinstance(record, RecordError):
                assert record.reason and name == str(path)
                continue
            if isinstance(record, RawLine):
                try:
                    record = record.parse(name, index)
                except RecordError:
                    continue
            _convert_and_render(spec, index, record, name)


BASE = {
    "model": {"family": "llava", "image_tokens": 8},
    "sources": [{"name": "s", "path": "data.jsonl", "format": "alpaca", "modality": "text"}],
    "mixture": {"budget": {"tokens": 1000}, "ratio": {"text": 1.0}, "seq_len": 256},
    "shards": {"target_tokens": 1000},
}
PATHS = ["model.family", "model.image_tokens", "model.config", "model.template", "sources", "sources.0",
         "sources.0.name", "sources.0.path", "sources.0.format", "sources.0.weight", "sources.0.limit",
         "sources.0.images", "sources.0.template", "mixture.budget", "mixture.budget.tokens",
         "mixture.budget.examples", "mixture.ratio.text", "mixture.ratio.by", "mixture.seq_len", "mixture.seed",
         "mixture.pack_buffer_tokens", "mixture.max_record_bytes", "mixture.max_upsample", "shards",
         "shards.target_tokens", "train.lr", "train.betas", "train.seed", "eval", "extra.key", "model"]


def _set(raw: dict, dotted: str, value) -> None:
    node = raw
    keys = dotted.split(".")
    for key in keys[:-1]:
        if isinstance(node, list):
            node = node[int(key)] if key.isdigit() and int(key) < len(node) else None
        elif isinstance(node, dict):
            node = node.setdefault(key, {})
        if not isinstance(node, (dict, list)):
            return
    if isinstance(node, dict):
        node[keys[-1]] = value
    elif isinstance(node, list) and keys[-1].isdigit() and int(keys[-1]) < len(node):
        node[int(keys[-1])] = value


@pytest.mark.timeout(120)
@FUZZ
@given(mutations=st.lists(st.tuples(st.sampled_from(PATHS), json_values), min_size=1, max_size=4))
def test_mutated_recipes_load_or_fail_in_one_line(mutations):
    """Loaded, then planned and packed over a small document table: a value the recipe admits must not
    fail later with anything but a PlanError (negative seeds, inf weights, tiny pack buffers, huge budgets)."""
    import numpy as np

    from mlan.mixture.pack import pack
    from mlan.mixture.plan import SourceDocs, make_plan
    from mlan.recipe import load_recipe

    raw = json.loads(json.dumps(BASE))
    for path, value in mutations:
        _set(raw, path, value)
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "data.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
        recipe = Path(folder) / "r.yaml"
        recipe.write_text(yaml.safe_dump(raw, allow_unicode=False))
        try:
            loaded = load_recipe(recipe)
        except MlanError as err:
            assert str(err)
            return
    mix = loaded.mixture
    lengths = np.arange(1, 41, dtype=np.int64) * max(1, mix.seq_len // 40)
    docs = [SourceDocs(name=s.name, modality=s.modality, weight=s.weight,
                       upsample=s.upsample if s.upsample is not None else mix.upsample,
                       n_tokens=lengths, has_images=np.arange(40) % 2 == 0 if s.modality == "image_text" else None)
            for s in loaded.sources]
    try:
        plan = make_plan(docs, budget_tokens=mix.budget.tokens, budget_examples=mix.budget.examples,
                         ratio_text=mix.ratio.text, ratio_by=mix.ratio.by, seed=mix.seed,
                         max_upsample=mix.max_upsample)
    except MlanError as err:
        assert str(err)
        return
    pack(plan.n_tokens, None, seq_len=mix.seq_len, max_images=mix.max_images_per_row,
         buffer_tokens=mix.pack_buffer_tokens)


@pytest.mark.timeout(120)
@FUZZ
@given(text=st.text(max_size=200) | st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
       overrides=st.lists(st.text(max_size=30) | st.builds(
           lambda k, v: f"{k}={v}", st.sampled_from(PATHS),
           st.sampled_from(["*x", "&a [*a]", "[", "{a: 1", "!!python/object:os.system ls", "- a", "'", "1e999",
                            ".nan", "-5", "null", "{}"]) | st.text(max_size=12)), max_size=2))
def test_any_recipe_text_and_override_loads_or_fails_in_one_line(text, overrides):
    from mlan.recipe import load_recipe

    with tempfile.TemporaryDirectory() as folder:
        recipe = Path(folder) / "r.yaml"
        recipe.write_bytes(text.encode("utf-8", "surrogatepass"))
        try:
            load_recipe(recipe, overrides)
        except MlanError as err:
            assert str(err)


@pytest.fixture(scope="module")
def cli_inputs(tmp_path_factory) -> dict[str, str]:
    """A tiny recipe and a few things that are not build folders, for the CLI fuzz."""
    tmp = tmp_path_factory.mktemp("cli")
    (tmp / "data.jsonl").write_text("".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) + "\n"
                                            for i in range(3)))
    (tmp / "r.yaml").write_text(yaml.safe_dump({**BASE, "sources": [{**BASE["sources"][0],
                                                                       "path": str(tmp / "data.jsonl")}]}))
    (tmp / "empty").mkdir()
    (tmp / "file.txt").write_text("hello")
    return {"recipe": str(tmp / "r.yaml"), "empty": str(tmp / "empty"), "file": str(tmp / "file.txt"),
            "missing": str(tmp / "missing")}


OPTIONS = ["--source", "s", "--limit", "1", "0", "-1", "--json", "--set", "mixture.seq_len=64",
           "mixture.seed=-1", "sources.s.weight=inf", "--row", "99", "x", "--help", "--", "=", "a=b"]


@pytest.mark.timeout(300)
@settings(derandomize=True, database=None, deadline=None, max_examples=40,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(command=st.sampled_from(["render", "verify", "inspect"]),
       target=st.sampled_from(["recipe", "empty", "file", "missing"]),
       options=st.lists(st.sampled_from(OPTIONS) | st.text(max_size=8), max_size=5))
def test_cli_options_exit_0_1_or_2_without_a_traceback(cli_inputs, capsys, command, target, options):
    from mlan.cli import main

    try:
        rc = main([command, cli_inputs[target], *options])
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        rc = exc.code
    captured = capsys.readouterr()
    assert rc in (0, 1, 2), (rc, captured.err[-2000:])
    assert "Traceback" not in captured.err
    if rc == 2:
        assert len([line for line in captured.err.splitlines() if ": error: " in line]) == 1, captured.err
