"""Issue #22 item 2: one bad record or file never stops a build.

Each hostile input below stopped a whole build with a Ray task traceback (exit 1, no stats, no
rejected.jsonl). Now each is listed in rejected.jsonl with its reason, the records before a damaged part
of a file are kept, and a source that yields nothing is one line, exit 2. Real builds on one local Ray
for the module (tiny budgets, one worker).
"""
from __future__ import annotations

import gzip
import json
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

pytestmark = [pytest.mark.timeout(300)]


def _alpaca(i: int) -> dict:
    return {"instruction": f"Say the number {i}.", "input": "", "output": f"{i}"}


def _recipe(tmp: Path, sources: list[dict], **mixture) -> Path:
    raw = {
        "model": {"family": "llava", "image_tokens": 8},
        "sources": sources,
        "mixture": {"budget": {"examples": 4}, "ratio": {"text": 1.0}, "seq_len": 256, **mixture},
    }
    path = tmp / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _build(tmp: Path, recipe: Path) -> dict:
    from mlan.mixture.build import build
    from mlan.recipe import load_recipe

    return build(load_recipe(recipe), str(tmp / "out"), workers=1, cache_dir=str(tmp / "cache"), progress=False)


def _listed(tmp: Path) -> list[dict]:
    return [json.loads(x) for x in (tmp / "out" / "rejected.jsonl").read_text().splitlines()]


def _complete_lines(truncated_gz: bytes) -> int:
    """How many whole lines a truncated gzip stream holds, decompressed independently with zlib."""
    text = zlib.decompressobj(wbits=31).decompress(truncated_gz)
    return text.count(b"\n")


@pytest.mark.slow  # ~25 s: a 10 MB record and four damaged files through a real build
def test_bad_records_and_damaged_files_are_listed_and_the_rest_is_built(local_ray, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    lines = [
        json.dumps(_alpaca(0)),
        '{"instruction": "lone \\ud800 surrogate", "input": "", "output": "x"}',  # record 1
        "[" * 100_000 + "]" * 100_000,  # record 2: 100,000 deep
        json.dumps(_alpaca(1)),
        json.dumps({"instruction": " " * 10_000_000, "input": "", "output": "y"}),  # record 4: 10 MB of spaces
        json.dumps(_alpaca(2)),
    ]
    (src / "a.jsonl").write_text("\n".join(lines) + "\n")
    whole = pa.Table.from_pylist([_alpaca(i) for i in range(10, 410)])
    pq.write_table(whole, tmp_path / "whole.parquet", row_group_size=50)
    data = (tmp_path / "whole.parquet").read_bytes()
    (src / "b.parquet").write_bytes(data[: len(data) // 2])  # truncated: no footer
    gz = gzip.compress(("".join(json.dumps(_alpaca(i)) + "\n" for i in range(1000, 3000))).encode())
    (src / "c.jsonl.gz").write_bytes(gz[: len(gz) // 2])  # truncated stream
    (src / "d.jsonl.gz").write_bytes(b'{"instruction": "not gzip", "input": "", "output": "z"}\n')  # fake .gz
    (src / "e.jsonl").write_text(json.dumps(_alpaca(3)) + "\n")

    recipe = _recipe(tmp_path, [{"name": "s", "path": str(src), "format": "alpaca", "modality": "text"}])
    stats = _build(tmp_path, recipe)  # before the fix: a Ray task traceback

    kept_gz = _complete_lines(gz[: len(gz) // 2])
    assert kept_gz > 0
    listed = _listed(tmp_path)
    by_file: dict[str, list[dict]] = {}
    for r in listed:
        by_file.setdefault(Path(r["file"]).name, []).append(r)
    a = {r["index"]: r["reason"] for r in by_file["a.jsonl"]}
    assert set(a) == {1, 2, 4}, a
    assert "surrogate" in a[1]
    assert "nested deeper than" in a[2]
    assert "mixture.max_record_bytes" in a[4] and "10,000,0" in a[4]
    (b,) = by_file["b.parquet"]
    assert b["index"] is None and "unreadable file" in b["reason"] and "Parquet" in b["reason"]
    (c,) = by_file["c.jsonl.gz"]
    assert c["index"] is None and f"after {kept_gz} records" in c["reason"]
    (d,) = by_file["d.jsonl.gz"]
    assert d["index"] is None and "gzip" in d["reason"].lower()
    s = stats["records"]["s"]
    # a.jsonl 6 lines + the gz's whole lines before the damage + e.jsonl 1
    assert s["read"] == 6 + kept_gz + 1 + 3  # the three unreadable files are listed as one entry each
    assert s["accepted"] == 3 + kept_gz + 1
    assert (tmp_path / "out" / "manifest.json").is_file()


def test_image_path_with_nul_is_a_rejected_record(local_ray, tmp_path):
    from PIL import Image

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(imgs / "ok.png")
    recs = [{"messages": [{"role": "user", "content": "<image>What colour?"},
                          {"role": "assistant", "content": "Red."}], "images": [name]}
            for name in ("ok.png", "ok\x00.png", "ok.png")]
    (tmp_path / "pics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    recipe = _recipe(tmp_path, [{"name": "pics", "path": str(tmp_path / "pics.jsonl"), "format": "messages",
                                 "modality": "image_text", "images": str(imgs)}], ratio={"text": 0.0})
    stats = _build(tmp_path, recipe)
    (bad,) = _listed(tmp_path)
    assert bad["index"] == 1 and "NUL" in bad["reason"], bad
    assert stats["records"]["pics"]["accepted"] == 2


def test_record_size_limit_is_a_recipe_key_checked_before_tokenizing(local_ray, tmp_path):
    recs = [_alpaca(0), {"instruction": "x" * 300, "input": "", "output": "y"}, _alpaca(1)]
    (tmp_path / "s.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    recipe = _recipe(tmp_path, [{"name": "s", "path": str(tmp_path / "s.jsonl"), "format": "alpaca",
                                 "modality": "text"}], max_record_bytes=200)
    stats = _build(tmp_path, recipe)
    (big,) = _listed(tmp_path)
    assert big["index"] == 1 and big["stage"] == "read"
    assert "301 bytes of text, more than mixture.max_record_bytes = 200" in big["reason"]
    assert stats["records"]["s"]["accepted"] == 2


def test_source_that_yields_nothing_is_one_line_exit_2(local_ray, tmp_path, capsys):
    from mlan.cli import main

    (tmp_path / "only.jsonl.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps(_alpaca(i)) + "\n" for i in range(5)))
    recipe = _recipe(tmp_path, [
        {"name": "good", "path": str(good), "format": "alpaca", "modality": "text"},
        {"name": "broken", "path": str(tmp_path / "only.jsonl.gz"), "format": "alpaca", "modality": "text"},
    ])
    rc = main(["build", str(recipe), "--out", str(tmp_path / "out"), "--workers", "1",
               "--cache", str(tmp_path / "cache")])
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("mlan build: error:")]
    assert rc == 2 and len(errors) == 1 and "Traceback" not in stderr, stderr
    err = errors[0]
    print(err)
    assert "source 'broken'" in err and "unreadable file" in err and "only.jsonl.gz" in err
    listed = _listed(tmp_path)
    assert [(r["source"], r["index"]) for r in listed] == [("broken", None)]


def test_render_applies_the_record_size_limit(tmp_path, capsys):
    """`mlan render` refuses what the build refuses, before the tokenizer (no Ray)."""
    from mlan.cli import main

    recs = [_alpaca(0), {"instruction": "x" * 300, "input": "", "output": "y"}]
    (tmp_path / "s.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    recipe = _recipe(tmp_path, [{"name": "s", "path": str(tmp_path / "s.jsonl"), "format": "alpaca",
                                 "modality": "text"}], max_record_bytes=200)
    assert main(["render", str(recipe), "--source", "s", "--json"]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 1  # record 0
    assert "record 1: 301 bytes of text, more than mixture.max_record_bytes = 200" in captured.err


def test_damaged_parquet_row_group_keeps_the_groups_before_it(tmp_path):
    """A Parquet file with an intact footer and a damaged third row group: its first 200 rows are kept."""
    from mlan.recipe import SourceSpec
    from mlan.sources.readers import iter_source
    from mlan.sources.records import RecordError

    rows = [{**_alpaca(i), "instruction": f"Say the number {i}. " + "pad " * 20} for i in range(400)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "whole.parquet", row_group_size=100)
    chunk = pq.ParquetFile(tmp_path / "whole.parquet").metadata.row_group(2).column(0)
    data = bytearray((tmp_path / "whole.parquet").read_bytes())
    start = chunk.data_page_offset
    data[start + 40: start + chunk.total_compressed_size - 10] = b"\xab" * (chunk.total_compressed_size - 50)
    (tmp_path / "bad.parquet").write_bytes(bytes(data))
    spec = SourceSpec(name="s", path=str(tmp_path / "bad.parquet"), format="alpaca", modality="text")
    out = [record for _, _, record in iter_source(spec)]
    assert out[:200] == rows[:200]
    (err,) = out[200:]
    assert isinstance(err, RecordError) and err.index is None and "after 200 records" in err.reason
