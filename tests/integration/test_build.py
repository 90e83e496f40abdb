"""`mlan build` end to end on real data with real Ray: exactness read back from the tars, determinism across
worker counts, cache reuse, an external cluster (--address, file:// output), SIGKILL resume, bad input,
`mlan verify` and `mlan inspect`.

One Ray head is started for the whole module (`ray start --head` on loopback, stopped by its process
group afterwards); in-process builds join it, subprocess builds pass `--address`.
"""
from __future__ import annotations

import io
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.slow]

PY = sys.executable
RAY = str(Path(sys.executable).with_name("ray"))
REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head():
    """A real Ray cluster (`ray start --head` on loopback) for subprocess builds with --address.

    Token auth stays on, with a token of this test's own in the subprocesses' environment (Ray reads it
    at import, so the in-process driver keeps its own local Ray). Stopped by killing its process group.
    """
    port = _free_port()
    temp = tempfile.mkdtemp(prefix="mr", dir="/tmp")  # short: Ray's unix sockets live under it
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false"}
    log = open(Path(temp) / "head.log", "wb")  # noqa: SIM115 - held by the head process until teardown
    proc = subprocess.Popen(
        [RAY, "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
         f"--temp-dir={temp}", "--include-dashboard=false", "--disable-usage-stats"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env,
    )
    address = f"127.0.0.1:{port}"
    probe = "import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); print(ray.cluster_resources()['CPU'])"
    deadline = time.time() + 120
    while True:
        r = subprocess.run([PY, "-c", probe, address], env=env, capture_output=True, text=True, timeout=120, check=False)
        if r.returncode == 0:
            break
        if time.time() > deadline or proc.poll() is not None:
            os.killpg(proc.pid, signal.SIGKILL)
            raise RuntimeError(f"ray head did not start: {(Path(temp) / 'head.log').read_text()[-2000:]}")
        time.sleep(1)
    yield address, env
    os.killpg(proc.pid, signal.SIGTERM)  # only the processes this fixture started (its own session)
    try:
        proc.wait(timeout=1)  # `ray start --block` outlasts 5 s of SIGTERM here: the group's SIGKILL ends it
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    log.close()
    shutil.rmtree(temp, ignore_errors=True)


# ---------------------------------------------------------------- reading tars with tarfile + numpy only
def read_tar_rows(path: Path) -> list[dict]:
    """Rows of one shard, decoded with plain tarfile/numpy (independent of mlan's reader)."""
    rows: dict[str, dict] = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, _, ext = m.name.partition(".")
            data = tar.extractfile(m).read()
            row = rows.setdefault(key, {"key": key, "images": []})
            if ext.endswith(".npy"):
                row[ext[:-4]] = np.load(io.BytesIO(data))
            elif ext == "json":
                row.update(json.loads(data))
            elif ext.startswith("img"):
                row["images"].append(data)
    return list(rows.values())


def tar_figures(out: Path) -> dict:
    manifest = json.loads((out / "manifest.json").read_text())
    seq_len = manifest["seq_len"]
    rows = [r for s in manifest["shards"] for r in read_tar_rows(out / s["name"])]
    by_mod, by_src, docs = Counter(), Counter(), Counter()
    tokens = 0
    for r in rows:
        assert r["ids"].dtype == np.uint32 and r["loss"].shape == r["ids"].shape
        assert int(r["docs"].sum()) == r["ids"].size <= seq_len  # document lengths sum to the row length
        assert len(r["images"]) == len(r["image_docs"])
        tokens += r["ids"].size
        for n, mod, src, did in zip(r["docs"].tolist(), r["modalities"], r["sources"], r["doc_ids"]):
            by_mod[mod] += n
            by_src[src] += n
            docs[did] += 1
    return {"rows": rows, "tokens": tokens, "by_mod": by_mod, "by_src": by_src, "docs": docs,
            "efficiency": tokens / (len(rows) * seq_len), "keys": [r["key"] for r in rows]}


def shard_shas(out: Path) -> list[str]:
    import hashlib

    return [hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((out / "shards").glob("*.tar"))]


def small_recipe(tmp: Path, shared: Path, name: str = "small.yaml", target_tokens: int = 4000, **mixture) -> Path:
    """A quick recipe over the real data: two text sources, one image-text source, by examples."""
    import yaml

    mix = {"budget": {"examples": 800}, "ratio": {"text": 0.75, "by": "examples"}, "seq_len": 1024, **mixture}
    raw = {
        "model": {"family": "llava", "tokenizer": "llama3", "image_tokens": 64},
        "sources": [
            {"name": "alpaca", "path": str(shared / "text/alpaca_en_demo.json"), "format": "alpaca",
             "modality": "text", "limit": 300},
            {"name": "gsm8k", "path": str(shared / "text/gsm8k_train.jsonl"), "format": "template",
             "modality": "text", "limit": 300, "weight": 2.0,
             "template": {"prompts": ["{question}"], "response": "{answer}"}},
            {"name": "nlvr", "path": str(shared / "image_text/nlvr_dev/dev.json"), "format": "template",
             "modality": "image_text", "limit": 150, "images": str(shared / "image_text/nlvr_dev"),
             "template": {"prompts": ["<image>\nTrue or false: {sentence}"], "response": "{label}",
                          "image": "images/{directory}/dev-{identifier}-0.png"}},
        ],
        "mixture": mix,
        "shards": {"target_tokens": target_tokens},
    }
    path = tmp / name
    path.write_text(yaml.safe_dump(raw))
    return path


# ---------------------------------------------------------------- the shared-data build
@pytest.fixture(scope="module")
def shared_build(shared_data_build):
    """recipes/shared-data.yaml as shipped (tests/conftest.py builds it once per session)."""
    return shared_data_build


@pytest.mark.timeout(400)
def test_shared_data_targets_recomputed_from_tars(shared_build):
    recipe, tmp, stats = shared_build
    fig = tar_figures(tmp / "out")
    seq_len = recipe.mixture.seq_len
    assert abs(fig["tokens"] - 2_000_000) <= seq_len
    ratio = fig["by_mod"]["text"] / fig["tokens"]
    assert abs(ratio - 0.75) <= 0.002
    assert fig["efficiency"] >= 0.995
    for mod in ("text", "image_text"):
        group = [s for s in recipe.sources if s.modality == mod]
        wsum = sum(s.weight for s in group)
        for s in group:
            share = fig["by_src"][s.name] / fig["by_mod"][mod]
            assert abs(share - s.weight / wsum) <= 0.01, (s.name, share)
    # stats.json says the same as the tars
    assert stats["tokens"]["total"] == fig["tokens"]
    assert stats["tokens"]["by_modality"] == dict(fig["by_mod"])
    assert abs(stats["ratio_achieved"] - ratio) < 1e-12
    assert abs(stats["packing_efficiency"] - fig["efficiency"]) < 1e-12
    assert len(set(fig["keys"])) == len(fig["keys"])  # row keys unique across the build
    manifest = json.loads((tmp / "out/manifest.json").read_text())
    assert manifest["family_config"]["family"] == "llava"
    assert manifest["totals"]["rows"] == len(fig["rows"])
    for f in ("stats.json", "report.md", "rejected.jsonl"):
        assert (tmp / "out" / f).is_file()
    report = (tmp / "out/report.md").read_text()
    assert "Target vs achieved" in report and "upsampling" in report and "packing efficiency" in report


@pytest.mark.timeout(400)
def test_every_planned_document_once_per_planned_copy(shared_build):
    """The tars hold exactly the plan's multiset of documents (plan rebuilt from the cache's counts)."""
    from mlan.mixture import cache as tcache
    from mlan.mixture.cache_key import source_cache_keys
    from mlan.mixture.plan import SourceDocs, make_plan
    from mlan.mixture.tokenize import _family_config

    recipe, tmp, _ = shared_build
    mix = recipe.mixture
    metas, sources = [], []
    for s, key in zip(recipe.sources, source_cache_keys(recipe, _family_config(recipe))):
        url = str(tmp / "cache" / key)
        meta = tcache.read_meta(url, tcache.read_complete(url)["parts"]).to_pydict()
        metas.append(meta)
        sources.append(SourceDocs(s.name, s.modality, s.weight, mix.upsample, np.asarray(meta["n_tokens"]),
                                  has_images=np.asarray(meta["n_images"]) > 0))  # each document on its own side
    plan = make_plan(sources, budget_tokens=mix.budget.tokens, ratio_text=mix.ratio.text, seed=mix.seed)
    want = Counter(metas[s]["doc_id"][d] for s, d in zip(plan.source.tolist(), plan.doc.tolist()))
    assert tar_figures(tmp / "out")["docs"] == want


@pytest.mark.timeout(400)
def test_cache_meta_file_equals_its_parts(shared_build):
    """The plan reads one meta file (written from what the actors returned); it must equal the parts' columns."""
    import pyarrow.parquet as pq

    from mlan.mixture import cache as tcache
    from mlan.mixture.cache_key import source_cache_keys
    from mlan.mixture.tokenize import _family_config

    recipe, tmp, _ = shared_build
    for s, key in zip(recipe.sources, source_cache_keys(recipe, _family_config(recipe))):
        url = tmp / "cache" / key
        n_parts = tcache.read_complete(str(url))["parts"]
        assert (url / tcache.META).exists()
        meta = tcache.read_meta(str(url), n_parts).to_pydict()
        for part in range(n_parts):
            cols = pq.read_table(url / f"part-{part:06d}.parquet", columns=list(tcache.META_COLUMNS)).to_pydict()
            rows = [r for r, p in enumerate(meta["part"]) if p == part]
            assert [meta["row"][r] for r in rows] == list(range(len(cols["index"])))
            for c in tcache.META_COLUMNS:
                assert [meta[c][r] for r in rows] == cols[c], (s.name, part, c)
        # a cache finished before meta files existed, and parts written by a killed run, are read back
        copy = tmp / "meta-copy" / url.name
        shutil.copytree(url, copy)
        (copy / tcache.META).unlink()
        assert tcache.read_meta(str(copy), n_parts).to_pydict() == meta
        tcache.write_meta(str(copy), n_parts, known={})
        assert (copy / tcache.META).exists() and tcache.read_meta(str(copy), n_parts).to_pydict() == meta


@pytest.mark.timeout(400)
def test_cache_hit_for_another_ratio_and_verify_inspect(shared_build, capsys):
    from mlan.cli import main
    from mlan.mixture.build import build

    recipe, tmp, _ = shared_build
    other = recipe.model_copy(update={"mixture": recipe.mixture.model_copy(
        update={"ratio": recipe.mixture.ratio.model_copy(update={"text": 0.5}),
                "budget": recipe.mixture.budget.model_copy(update={"tokens": 300_000})})})
    capsys.readouterr()
    stats = build(other, str(tmp / "out50"), workers=1, cache_dir=str(tmp / "cache"), progress=True)
    err = capsys.readouterr().err
    assert err.count("cache hit") == len(recipe.sources) and "tokenizing" not in err
    assert abs(stats["ratio_achieved"] - 0.5) < 0.01

    assert main(["verify", str(tmp / "out")]) == 0
    assert main(["inspect", str(tmp / "out"), "--row", "3"]) == 0
    shown = capsys.readouterr().out
    assert "── document 0" in shown and "[[" in shown and "<|start_header_id|>" in shown
    # a damaged copy: verify names the bad shard and exits non-zero
    bad = tmp / "bad"
    shutil.copytree(tmp / "out", bad)
    victim = sorted((bad / "shards").glob("*.tar"))[1]
    data = bytearray(victim.read_bytes())
    data[1000] ^= 0xFF
    victim.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["verify", str(bad)]) == 1
    assert victim.name in capsys.readouterr().err


# ---------------------------------------------------------------- determinism, by-examples, --address, resume
@pytest.mark.timeout(400)
def test_workers_1_and_2_identical_and_examples_exact(local_ray, shared_data, tmp_path):
    from mlan.mixture.build import build
    from mlan.recipe import load_recipe

    recipe = load_recipe(small_recipe(tmp_path, shared_data))
    build(recipe, str(tmp_path / "w1"), workers=1, cache_dir=str(tmp_path / "c1"), progress=False)
    build(recipe, str(tmp_path / "w2"), workers=2, cache_dir=str(tmp_path / "c2"), progress=False)
    assert shard_shas(tmp_path / "w1") == shard_shas(tmp_path / "w2") and len(shard_shas(tmp_path / "w1")) > 5
    m1, m2 = (json.loads((tmp_path / w / "manifest.json").read_text()) for w in ("w1", "w2"))
    m1.pop("fingerprint"), m2.pop("fingerprint")  # hashes the rendering code too (others may edit it meanwhile)
    assert m1 == m2
    fig = tar_figures(tmp_path / "w1")
    n_by_mod = Counter()
    for r in fig["rows"]:
        n_by_mod.update(r["modalities"])
    assert n_by_mod == {"text": 600, "image_text": 200}  # 800 examples at 0.75, exactly


@pytest.mark.timeout(500)
def test_address_build_sigkill_resume_is_byte_identical(local_ray, ray_head, shared_data, tmp_path):
    from mlan.mixture.build import PROGRESS_DIR, build
    from mlan.recipe import load_recipe

    path = small_recipe(tmp_path, shared_data, target_tokens=2000)
    recipe = load_recipe(path)
    cache = str(tmp_path / "cache")
    build(recipe, str(tmp_path / "ref"), cache_dir=cache, progress=False)  # uninterrupted reference
    out = tmp_path / "resumed"
    address, env = ray_head
    cmd = [PY, "-m", "mlan.cli", "build", str(path), "--out", f"file://{out}", "--address", address,
           "--cache", cache]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.time() + 240
    killed_with: set[str] = set()
    while time.time() < deadline and proc.poll() is None:
        done = {p.name for p in (out / PROGRESS_DIR).glob("shard-*.json")} if (out / PROGRESS_DIR).is_dir() else set()
        if len(done) >= 2 and not (out / "manifest.json").exists():
            proc.send_signal(signal.SIGKILL)
            killed_with = done
            break
        time.sleep(0.005)
    proc.wait(timeout=60)
    assert killed_with, f"build ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    assert proc.returncode == -signal.SIGKILL and not (out / "manifest.json").exists()
    time.sleep(2)  # let the cluster's shard tasks of the dead driver settle
    finished = {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("*.tar")}
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, check=False)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert shard_shas(out) == shard_shas(tmp_path / "ref")
    for f in ("manifest.json", "stats.json", "report.md", "rejected.jsonl"):
        assert (out / f).read_bytes() == (tmp_path / "ref" / f).read_bytes(), f
    assert finished and all((out / "shards" / n).stat().st_mtime_ns == t for n, t in finished.items())  # not rewritten


# ---------------------------------------------------------------- bad input
@pytest.mark.timeout(400)
def test_bad_records_are_rejected_counted_and_listed(local_ray, shared_data, tmp_path):
    import yaml
    from PIL import Image

    from mlan.mixture.build import build
    from mlan.recipe import load_recipe

    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(4):
        Image.new("RGB", (32 + i, 24), (i * 40, 10, 10)).save(root / f"{i}.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "outside.png")
    good = [{"q": f"What is in picture {i}?", "a": f"Picture {i}.", "img": f"{i}.png"} for i in range(4)]
    lines = [json.dumps(good[0]), "{not json", json.dumps(good[1]), json.dumps({**good[2], "img": "missing.png"}),
             json.dumps(good[2]), json.dumps({**good[3], "img": "../outside.png"}), json.dumps(good[3])]
    (tmp_path / "img.jsonl").write_text("\n".join(lines) + "\n")
    raw = {
        "model": {"family": "llava", "image_tokens": 8},
        "sources": [
            {"name": "alpaca", "path": str(shared_data / "text/alpaca_en_demo.json"), "format": "alpaca",
             "modality": "text", "limit": 50},
            {"name": "pics", "path": f"file://{tmp_path}/img.jsonl", "format": "template", "modality": "image_text",
             "images": str(root), "template": {"prompts": ["<image>\n{q}"], "response": "{a}", "image": "{img}"}},
        ],
        "mixture": {"budget": {"examples": 60}, "ratio": {"text": 0.5, "by": "examples"}, "seq_len": 2048},
    }
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(raw))
    stats = build(load_recipe(tmp_path / "bad.yaml"), str(tmp_path / "out"), workers=1,
                  cache_dir=str(tmp_path / "cache"), progress=False)
    pics = stats["records"]["pics"]
    assert pics == {"read": 7, "accepted": 4, "rejected": 3, "dropped": 0, "truncated": 0, "notes": {}}
    assert pics["read"] == pics["accepted"] + pics["rejected"] + pics["dropped"]
    assert sum(stats["rejected"].values()) == 3 and len(stats["rejected"]) == 3  # three different reasons
    rejected = [json.loads(x) for x in (tmp_path / "out/rejected.jsonl").read_text().splitlines()]
    assert sorted((r["source"], r["index"]) for r in rejected) == [("pics", 1), ("pics", 3), ("pics", 5)]
    reasons = " | ".join(r["reason"] for r in rejected)
    assert "not found" in reasons and "outside the image root" in reasons
    assert "malformed JSON on line 2" in reasons  # parsed on the worker, reported as an eager read would
    # no valid record lost: each of the 4 good pictures is in the shards (30 image docs from 4 → all present)
    fig = tar_figures(tmp_path / "out")
    pic_docs = {d for d in fig["docs"] if d.startswith("pics:")}
    assert sorted(int(d.split(":")[1]) for d in pic_docs) == [0, 2, 4, 6]
    assert sum(n for d, n in fig["docs"].items() if d.startswith("pics:")) == 30


@pytest.mark.timeout(120)
def test_impossible_plan_fails_before_work(tmp_path, shared_data):
    from mlan.cli import main

    (tmp_path / "r.yaml").write_text(
        f"sources:\n  - {{name: a, path: {shared_data}/text/alpaca_en_demo.json, format: alpaca, modality: text}}\n"
    )
    t = time.time()
    assert main(["build", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "o")]) == 2
    assert time.time() - t < 30 and not (tmp_path / "o").exists()


@pytest.mark.timeout(300)
def test_mllama_build_one_image_token_per_image(local_ray, shared_data, tmp_path):
    import yaml

    from mlan.mixture.build import build
    from mlan.recipe import load_recipe

    path = small_recipe(tmp_path, shared_data)
    raw = yaml.safe_load(path.read_text())
    raw["model"] = {"family": "mllama", "tokenizer": "llama3"}
    for s in raw["sources"]:
        s["limit"] = 40
    raw["mixture"]["budget"] = {"examples": 100}
    path.write_text(yaml.safe_dump(raw))
    stats = build(load_recipe(path), str(tmp_path / "out"), workers=1, cache_dir=str(tmp_path / "c"), progress=False)
    manifest = json.loads((tmp_path / "out/manifest.json").read_text())
    fc = manifest["family_config"]
    assert fc["family"] == "mllama" and fc["image_token_id"] == 128256 and fc["image_tokens"] == 1
    fig = tar_figures(tmp_path / "out")
    n_images = 0
    for r in fig["rows"]:
        bounds = np.concatenate([[0], np.cumsum(r["docs"])]).astype(int).tolist()
        for j, mod in enumerate(r["modalities"]):
            ids = r["ids"][bounds[j] : bounds[j + 1]]
            want = sum(1 for d in r["image_docs"] if d == j)
            assert int((ids == 128256).sum()) == want and (want > 0) == (mod == "image_text")
            assert not r["loss"][bounds[j] : bounds[j + 1]][ids == 128256].any()  # image token never trained
        n_images += len(r["images"])
    assert n_images == stats["images"] == 25 and sum(stats["tiles"].values()) == 25


def test_an_address_nobody_answers_is_one_line_exit_2(shared_data, tmp_path):
    """`--address` naming a port with no Ray behind it: one line at once (was ray.init's ~20 s of retries, then a
    ConnectionError traceback and exit 1)."""
    port = _free_port()
    res = subprocess.run([PY, "-m", "mlan.cli", "build", str(REPO / "recipes" / "tiny-llava.yaml"), "--out",
                          str(tmp_path / "out"), "--address", f"127.0.0.1:{port}"],
                         capture_output=True, text=True, timeout=120, check=False,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    errors = [ln for ln in res.stderr.splitlines() if "error" in ln]
    want = (f"mlan build: error: --address 127.0.0.1:{port}: no Ray cluster answers there (Connection refused); "
            "start one with `ray start --head` or leave --address out for a local Ray")
    assert errors == [want], errors
