"""Builds on the real data in ../shared/data, read back the way training reads them (issue 11).

One resolved recipe (the actors' geometry is the driver's, so every row passes the loader's own check),
`mlan verify` reading every row, documents counted on the side of the ratio they are, image-aware
packing, and diagnostics (dropped documents listed, a failed source still leaves rejected.jsonl).
"""
from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def loader_rows(out: Path) -> int:
    """Every row of a build read through the training loader (its own row checks); the rows read."""
    from mlan.data.loader import make_loader

    loader = make_loader(str(out), rank=0, world_size=1, batch_rows=1, workers=0, seed=0, verify=True)
    return sum(1 for _ in loader)  # batch_rows=1: one batch per row


def image_tokens_per_image(out: Path) -> set[int]:
    """Image placeholders per image in the tars (counted with tarfile + numpy, not with mlan)."""
    manifest = json.loads((out / "manifest.json").read_text())
    image_id = manifest["family_config"]["image_token_id"]
    per: set[int] = set()
    for s in manifest["shards"]:
        rows: dict[str, dict] = {}
        with tarfile.open(out / s["name"]) as tar:
            for m in tar.getmembers():
                key, _, ext = m.name.partition(".")
                r = rows.setdefault(key, {"n_images": 0})
                if ext == "ids.npy":
                    r["ids"] = np.load(io.BytesIO(tar.extractfile(m).read()))
                elif ext.startswith("img"):
                    r["n_images"] += 1
        for r in rows.values():
            if r["n_images"]:
                per.add(int((r["ids"] == image_id).sum()) // r["n_images"])
                assert int((r["ids"] == image_id).sum()) % r["n_images"] == 0
    return per


@pytest.fixture(scope="module")
def shared_small(local_ray, shared_data, tmp_path_factory):
    """recipes/shared-data.yaml as shipped (llava, tiny config, image_tokens left to the family), smaller."""
    from mlan.mixture.build import build
    from mlan.recipe import load_recipe

    tmp = tmp_path_factory.mktemp("shared_small")
    recipe = load_recipe(REPO / "recipes/shared-data.yaml", [
        "mixture.budget.tokens=60000", "mixture.seq_len=1024", "sources.gsm8k.limit=400", "sources.nlvr.limit=300",
        "shards.target_tokens=20000",
    ])
    stats = build(recipe, str(tmp / "out"), workers=2, cache_dir=str(tmp / "cache"), progress=False)
    return recipe, tmp / "out", stats


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_actors_use_the_drivers_geometry(shared_small):
    """Defect: actors re-validated a dump of the recipe, so defaults became explicit (576 vs 16 placeholders)."""
    from mlan.families.registry import get_family

    recipe, out, _ = shared_small
    manifest = json.loads((out / "manifest.json").read_text())
    want = get_family(recipe.model).family_config()
    assert manifest["family_config"] == want
    assert want["image_tokens"] == 16  # the tiny llava geometry, not the 576 default of a real CLIP
    assert image_tokens_per_image(out) == {16}
    assert loader_rows(out) == manifest["totals"]["rows"]  # the loader rejects no row


def _rewrite_row(out: Path, change) -> str:
    """Apply `change(sample)` to the first image row of the build and fix sha256 and counts in the manifest,
    so only a check that reads the rows can tell."""
    import hashlib

    from mlan.mixture.shards import iter_tar_samples, sample_to_row, write_tar
    from mlan.mixture.verify import shard_counts

    manifest = json.loads((out / "manifest.json").read_text())
    for shard in manifest["shards"]:
        path = out / shard["name"]
        with open(path, "rb") as f:
            samples = list(iter_tar_samples(f))
        hit = next((s for s in samples if any(k.startswith("img") for k in s)), None)
        if hit is None:
            continue
        change(hit)
        with open(path, "wb") as f:
            write_tar(f, samples)
        shard["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
        counts = shard_counts([sample_to_row(s) for s in samples])
        for k in ("rows", "tokens", "loss_tokens"):
            shard[k] = counts[k]
        manifest["totals"]["loss_tokens"] = sum(s["loss_tokens"] for s in manifest["shards"])
        (out / "manifest.json").write_text(json.dumps(manifest))
        return hit["__key__"]
    raise AssertionError("no image row in the build")


def _copy_build(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".progress"))
    return dst


def _ids_change(fn):
    from mlan.mixture.shards import _from_npy, _npy

    def change(sample):
        ids = _from_npy(sample["ids.npy"]).copy()
        loss = _from_npy(sample["loss.npy"]).copy()
        fn(ids, loss)
        sample["ids.npy"], sample["loss.npy"] = _npy(ids), _npy(loss)
    return change


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_verify_reads_every_row(shared_small, tmp_path):
    """Defect: `mlan verify` checked sha256s and counts only; a row the loader rejects passed."""
    from mlan.mixture.verify import verify_build

    _, out, _ = shared_small
    assert verify_build(str(out)) == []
    fc = json.loads((out / "manifest.json").read_text())["family_config"]
    image_id = fc["image_token_id"]

    def drop_a_placeholder(ids, loss):
        ids[int(np.argmax(ids == image_id))] = 13  # a text token instead of one image placeholder

    def train_on_image(ids, loss):
        loss[int(np.argmax(ids == image_id))] = 1

    def truncate_image(sample):
        k = next(k for k in sample if k.startswith("img"))
        sample[k] = sample[k][: len(sample[k]) // 2]

    cases = [(drop_a_placeholder, "image tokens for"), (train_on_image, "loss positions fall on image tokens")]
    for i, (fn, says) in enumerate(cases):
        b = _copy_build(out, tmp_path / f"b{i}")
        key = _rewrite_row(b, _ids_change(fn))
        problems = verify_build(str(b))
        assert problems and all(f"row {key}" in p for p in problems), problems
        assert any(says in p for p in problems), problems
    b = _copy_build(out, tmp_path / "trunc")
    key = _rewrite_row(b, truncate_image)
    problems = verify_build(str(b))
    assert len(problems) == 1 and f"row {key}" in problems[0] and "cannot decode image" in problems[0], problems
    r = subprocess.run([sys.executable, "-m", "mlan.cli", "verify", str(b)], capture_output=True, text=True, env=ENV,
                       check=False)
    assert r.returncode == 1 and f"row {key}" in r.stderr


def test_verify_manifest_not_json(tmp_path):
    """Defect: a manifest that is not valid JSON gave a traceback; now one line, exit 2."""
    (tmp_path / "manifest.json").write_text('{"version": 1, "shards": [')
    r = subprocess.run([sys.executable, "-m", "mlan.cli", "verify", str(tmp_path)], capture_output=True, text=True,
                       env=ENV, check=False)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "manifest.json: not valid JSON" in lines[0] and "Traceback" not in r.stderr


def _jpeg(path: Path, w: int, h: int, seed: int) -> bytes:
    from PIL import Image
    from shardkit import synthetic_photo

    Image.fromarray(synthetic_photo(w, h, seed)).save(path, format="JPEG", quality=85)
    return path.read_bytes()


def _mixed_source(tmp: Path) -> Path:
    """A LLaMA-Factory `messages` file mixing image and text-only conversations, plus records the build must
    list: a truncated JPEG, a document over seq_len (overlong: drop) and one with more images than a row holds."""
    imgs = tmp / "imgs"
    imgs.mkdir()
    for i in range(4):
        _jpeg(imgs / f"{i}.jpg", 64 + 8 * i, 48, i)
    data = (imgs / "0.jpg").read_bytes()
    (imgs / "cut.jpg").write_bytes(data[: len(data) // 2])
    rng = np.random.default_rng(0)
    words = ["the", "a", "cat", "dog", "sat", "ran", "on", "under", "big", "small", "red", "blue"]
    recs = []
    for i in range(120):
        answer = " ".join(rng.choice(words, 40))
        if i % 3 == 0:  # one in three is a text-only conversation
            recs.append({"messages": [{"role": "user", "content": f"Tell me a story number {i}."},
                                      {"role": "assistant", "content": answer}]})
        else:
            recs.append({"messages": [{"role": "user", "content": f"<image>What is in picture {i}?"},
                                      {"role": "assistant", "content": answer}], "images": [f"{i % 4}.jpg"]})
    recs.append({"messages": [{"role": "user", "content": "<image>And this one?"},
                              {"role": "assistant", "content": "A cut picture."}], "images": ["cut.jpg"]})  # 120
    recs.append({"messages": [{"role": "user", "content": "Go on. " * 400},
                              {"role": "assistant", "content": "Too long."}]})  # 121: dropped for length
    recs.append({"messages": [{"role": "user", "content": "<image><image><image>Compare."},
                              {"role": "assistant", "content": "Three."}], "images": ["0.jpg", "1.jpg", "2.jpg"]})  # 122
    path = tmp / "mixed.json"
    path.write_text(json.dumps(recs))
    return path


def _recipe(tmp: Path, shared: Path, mixed: Path, **extra) -> Path:
    import yaml

    raw = {
        "model": {"family": "llava", "tokenizer": "llama3", "config": "tiny"},
        "sources": [
            {"name": "alpaca", "path": str(shared / "text/alpaca_en_demo.json"), "format": "alpaca",
             "modality": "text", "limit": 300},
            {"name": "mixed", "path": str(mixed), "format": "messages", "modality": "image_text",
             "images": str(mixed.parent / "imgs")},
        ],
        "mixture": {"budget": {"tokens": 40000}, "ratio": {"text": 0.75, "by": "tokens"}, "seq_len": 512,
                    "overlong": "drop", "max_images_per_row": 2},
        "shards": {"target_tokens": 20000},
        **extra,
    }
    path = tmp / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_mixed_source_ratio_and_every_record_listed(local_ray, shared_data, tmp_path):
    """Defects: text-only records of an image_text source bent the ratio; documents dropped for length were
    listed nowhere; plan-time rejections had no file; reasons carried no path."""
    from mlan.mixture.build import build
    from mlan.recipe import load_recipe

    mixed = _mixed_source(tmp_path)
    recipe = load_recipe(_recipe(tmp_path, shared_data, mixed))
    out = tmp_path / "out"
    stats = build(recipe, str(out), workers=2, cache_dir=str(tmp_path / "cache"), progress=False)
    # the ratio, recomputed from the tars by each document's own modality (has images or not)
    manifest = json.loads((out / "manifest.json").read_text())
    text = total = longest = 0
    for s in manifest["shards"]:
        from mlan.mixture.shards import read_shard

        for row in read_shard(str(out / s["name"])):
            owners = set(row.image_docs)
            for j, n in enumerate(row.docs.tolist()):
                total += n
                longest = max(longest, n)
                text += n if j not in owners else 0
                assert (row.modalities[j] == "image_text") == (j in owners)
    assert abs(text / total - 0.75) <= longest / total, text / total
    assert stats["by_source_modality"]["mixed"]["text"]["documents"] > 0
    report = (out / "report.md").read_text()
    assert "by source × modality" in report and "| mixed |" in report
    # every record that did not reach the mixture is listed, with its file and why
    listed = {r["index"]: r for r in map(json.loads, (out / "rejected.jsonl").read_text().splitlines())
              if r["source"] == "mixed"}
    assert set(listed) == {120, 121, 122}, listed
    assert listed[120]["kind"] == "rejected" and listed[120]["stage"] == "render"
    assert str(mixed.parent / "imgs" / "cut.jpg") in listed[120]["reason"]
    assert listed[121]["kind"] == "dropped" and "seq_len 512" in listed[121]["reason"]
    assert listed[122]["stage"] == "plan" and "max_images_per_row" in listed[122]["reason"]
    for r in listed.values():
        assert r["file"] == str(mixed) and " at 0x" not in r["reason"]
    assert loader_rows(out) == manifest["totals"]["rows"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_source_with_nothing_usable_still_lists_why(local_ray, shared_data, tmp_path):
    """Defect: a source with no usable record (a truncated JSON array) failed without rejected.jsonl or reason."""
    from mlan.mixture.build import build
    from mlan.mixture.plan import PlanError
    from mlan.recipe import load_recipe

    mixed = _mixed_source(tmp_path)
    mixed.write_text(mixed.read_text()[:5000])  # a truncated JSON array
    recipe = load_recipe(_recipe(tmp_path, shared_data, mixed))
    out = tmp_path / "out"
    with pytest.raises(PlanError) as err:
        build(recipe, str(out), workers=1, cache_dir=str(tmp_path / "cache"), progress=False)
    msg = str(err.value)
    assert "source 'mixed': 0 of 1 records usable" in msg and "malformed JSON array" in msg and str(mixed) in msg
    assert "\n" not in msg and "rejected.jsonl" in msg
    listed = [json.loads(x) for x in (out / "rejected.jsonl").read_text().splitlines()]
    assert [(r["file"], r["kind"]) for r in listed if r["source"] == "mixed"] == [(str(mixed), "rejected")]
    assert {r["kind"] for r in listed if r["source"] == "alpaca"} == {"dropped"}  # over seq_len 512


def _local_data(recipe) -> str | None:
    """Why a recipe's data is not all here (None when every source path exists locally)."""
    for s in recipe.sources:
        if "://" in s.path or not Path(s.path).exists():
            return f"source {s.name!r}: {s.path} is not here (hub id or missing file)"
        if s.images and not Path(s.images).exists():
            return f"source {s.name!r}: image root {s.images} is not here"
    return None


def tar_rows_and_bound(out: Path) -> tuple[int, int, int]:
    """(rows, row bound, placeholders per image) recomputed from the tars with tarfile + numpy."""
    manifest = json.loads((out / "manifest.json").read_text())
    seq_len, fc = manifest["seq_len"], manifest["family_config"]
    max_images = manifest["recipe"]["mixture"]["max_images_per_row"]
    rows = tokens = images = 0
    for s in manifest["shards"]:
        with tarfile.open(out / s["name"]) as tar:
            for m in tar.getmembers():
                ext = m.name.partition(".")[2]
                if ext == "ids.npy":
                    rows += 1
                    tokens += np.load(io.BytesIO(tar.extractfile(m).read())).size
                elif ext.startswith("img"):
                    images += 1
    return rows, max(math.ceil(tokens / seq_len), math.ceil(images / max_images)), fc["image_tokens"]


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "recipes").glob("*.yaml")
                                          if not p.stem.startswith("continual-")))  # continual: own schema
def test_every_shipped_recipe_builds_rows_the_loader_accepts(local_ray, name, tmp_path, request):
    """Each shipped recipe whose data is present: built as shipped, every row read through the loader (none
    rejected), `mlan verify` reading every row finds nothing, the manifest's geometry is the tars' and the
    family's, and packing is within 1% of the row bound (3% for the demo's 128-token rows)."""
    from mlan.families.registry import get_family
    from mlan.mixture.build import build
    from mlan.mixture.verify import verify_build
    from mlan.recipe import load_recipe

    path = REPO / "recipes" / f"{name}.yaml"
    if name == "demo":  # its data is generated, as `mlan demo` does, beside a copy of the recipe
        from mlan.demo import prepare_demo

        path = prepare_demo(tmp_path / "demo")
    recipe = load_recipe(path)
    why = _local_data(recipe)
    if why:
        pytest.skip(why)
    if name == "shared-data":  # the same build test_build.py reads: built once per session (tests/conftest.py)
        _, root, stats = request.getfixturevalue("shared_data_build")
        out = root / "out"
    else:
        out = tmp_path / "out"
        stats = build(recipe, str(out), workers=2, cache_dir=str(tmp_path / "cache"), progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    fc = get_family(recipe.model).family_config()
    assert manifest["family_config"] == fc
    per = image_tokens_per_image(out)
    assert per <= {fc["image_tokens"]}, (per, fc)
    assert verify_build(str(out)) == []
    assert loader_rows(out) == manifest["totals"]["rows"]
    rows, bound, _ = tar_rows_and_bound(out)
    assert rows == stats["rows"] and bound == stats["row_bound"]
    # the 1% is for these three builds; the demo's 128-token rows of 18–36-token documents leave
    # a few tokens per row that greedy best fit cannot place (240 rows for a bound of 235)
    slack = 1.01 if name in ("tiny-llava", "tiny-mllama", "shared-data") else 1.03
    assert rows <= bound * slack, (name, rows, bound)
    print(f"{name}: {rows} rows, bound {bound}, efficiency {stats['packing_efficiency']:.4f}")


@pytest.mark.timeout(300)
def test_build_keeps_every_tree_path_and_counts_conversion_notes(local_ray, tmp_path):
    """An OpenAssistant tree read with `tree_paths: all` gives one document per path (not only the first), and a
    completion's cut end marker is counted per source in stats.json and report.md."""
    from mlan.mixture.build import build
    from mlan.recipe import load_recipe
    from mlan.sources import iter_source, to_conversations

    fixtures = REPO / "tests" / "fixtures" / "formats"
    (tmp_path / "r.yaml").write_text(f"""
model: {{family: llava, tokenizer: llama3, config: tiny, image_tokens: 16}}
sources:
  - {{name: trees, path: {fixtures / 'oasst_trees.jsonl'}, format: oasst, modality: text, tree_paths: all}}
  - {{name: completions, path: {fixtures / 'prompt_completion_markers.jsonl'}, format: prompt_completion,
     modality: text}}
mixture: {{budget: {{examples: 4}}, ratio: {{text: 1.0, by: examples}}, seq_len: 512}}
""")
    recipe = load_recipe(tmp_path / "r.yaml")
    stats = build(recipe, str(tmp_path / "out"), workers=1, cache_dir=str(tmp_path / "cache"), progress=False)
    trees = recipe.source("trees")
    paths = sum(len(to_conversations(trees, i, rec, f)) for f, i, rec in iter_source(trees))
    assert paths > sum(1 for _ in iter_source(trees))  # the fixture's trees do branch
    assert stats["records"]["trees"]["accepted"] == paths
    marked = [json.loads(line)["completion"] for line in
              (fixtures / "prompt_completion_markers.jsonl").read_text().splitlines() if line.strip()]
    ends_marked = sum(c.rstrip().endswith(("<|endoftext|>", "</s>")) for c in marked)
    assert stats["records"]["completions"]["notes"] == {"stripped end marker": ends_marked}
    assert f"| completions | stripped end marker | {ends_marked} |" in (tmp_path / "out" / "report.md").read_text()
