"""Faults (issue #22 item 6): a `mlan merge` SIGKILLed after its first output file reruns cleanly to the same
result as an uninterrupted merge; two builds sharing one `--cache` at once give identical shards."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import LlamaForCausalLM, LlavaForConditionalGeneration

from mlan.families.tiny import tiny_llama_config, tiny_llava_config
from mlan.merge import MergeConfig, merge_checkpoints

VOCAB = 16001


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            for name in f.keys():  # noqa: SIM118  (safe_open is not a dict)
                out[name] = f.get_tensor(name)
    return out


@pytest.fixture(scope="module")
def many_shard_pair(tmp_path_factory) -> tuple[Path, Path]:
    """A LLaVA and a Llama base sharing its tower's names, each in dozens of small shards (so a merge writes
    many files and a kill can land between them)."""
    root = tmp_path_factory.mktemp("merge_pair")
    torch.manual_seed(0)
    config = tiny_llava_config(num_layers=2, hidden=64)
    config.text_config.vocab_size, config.image_token_id = VOCAB, VOCAB - 1
    config.text_config.pad_token_id = VOCAB - 2
    LlavaForConditionalGeneration(config).save_pretrained(root / "vlm", max_shard_size="100KB")
    vlm = _tensors(root / "vlm")
    base_config = tiny_llama_config(2, 64, vocab_size=VOCAB)
    base_config.pad_token_id = VOCAB - 2
    base = LlamaForCausalLM(base_config)
    state = base.state_dict()
    for name, tensor in vlm.items():
        if name.startswith("language_model.model."):
            state["model." + name[len("language_model.model."):]] = tensor + 0.01
        elif name.startswith("language_model.lm_head."):
            state["lm_head." + name[len("language_model.lm_head."):]] = tensor - 0.01
    base.load_state_dict(state)
    base.save_pretrained(root / "llm", max_shard_size="100KB")
    assert len(list((root / "vlm").glob("*.safetensors"))) >= 6
    return root / "vlm", root / "llm"


def _first_merged_file(root: Path) -> Path | None:
    """Any finished merged shard under `root` (in --out or in a staging folder beside it)."""
    return next((p for p in root.rglob("model-*.safetensors") if p.is_file()), None)


@pytest.mark.slow
def test_merge_killed_after_its_first_file_reruns_to_the_uninterrupted_result(many_shard_pair, tmp_path) -> None:
    vlm, llm = many_shard_pair
    config = MergeConfig(alpha=0.5, density=0.3, scope="global")
    merge_checkpoints(vlm, llm, tmp_path / "clean", config)

    work = tmp_path / "killed"
    work.mkdir()
    out = work / "merged"
    cmd = [sys.executable, "-m", "mlan.cli", "merge", "--vlm", str(vlm), "--llm", str(llm), "--alpha", "0.5", "--density", "0.3",
           "--scope", "global", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while _first_merged_file(work) is None and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the merge finished before the kill; the test needs more shards"
    assert not (out / "merge.json").exists()

    rerun = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    clean, resumed = _tensors(tmp_path / "clean"), _tensors(out)
    assert clean.keys() == resumed.keys() and all(torch.equal(clean[k], resumed[k]) for k in clean)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (tmp_path / "clean").iterdir())
    assert [p.name for p in work.iterdir()] == ["merged"]  # no staging folder left behind


def _tiny_recipe(tmp: Path, shared: Path) -> Path:
    import yaml

    raw = {
        "model": {"family": "llava", "tokenizer": "llama3", "image_tokens": 16},
        "sources": [
            {"name": "alpaca", "path": str(shared / "text/alpaca_en_demo.json"), "format": "alpaca",
             "modality": "text", "limit": 60},
            {"name": "gsm8k", "path": str(shared / "text/gsm8k_train.jsonl"), "format": "template",
             "modality": "text", "limit": 60, "template": {"prompts": ["{question}"], "response": "{answer}"}},
        ],
        "mixture": {"budget": {"examples": 80}, "ratio": {"text": 1.0}, "seq_len": 512},
        "shards": {"target_tokens": 2000},
    }
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _shard_shas(out: Path) -> list[str]:
    import hashlib

    return [hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((out / "shards").glob("*.tar"))]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_builds_sharing_one_cache_at_once_give_identical_shards(shared_data, tmp_path) -> None:
    recipe, cache = _tiny_recipe(tmp_path, shared_data), tmp_path / "cache"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false"}
    procs = [subprocess.Popen([sys.executable, "-m", "mlan.cli", "build", str(recipe), "--out", str(tmp_path / name),
                               "--cache", str(cache), "--workers", "1"], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
             for name in ("a", "b")]
    errors = [p.communicate(timeout=500)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for e in errors]
    shas = _shard_shas(tmp_path / "a")
    assert shas and shas == _shard_shas(tmp_path / "b")
    a, b = ((tmp_path / n / "manifest.json").read_text() for n in ("a", "b"))
    assert a == b
    leftovers = [p.name for p in cache.rglob("*") if p.name.endswith(".tmp") or p.name == ".mlan.lock"]
    assert leftovers == []
    entries = [p for p in cache.iterdir() if p.is_dir()]
    assert len(entries) == 2 and all((e / "_SUCCESS").is_file() for e in entries)


def _write_part_repeatedly(cache: str, barrier, rounds: int, errors) -> None:
    from mlan.mixture import cache as tcache

    summary = tcache.PartSummary(part=0, read=0, accepted=0, rejected=[], dropped=[], truncated=0, tokens=0)
    for _ in range(rounds):
        barrier.wait()
        try:
            tcache.write_part(cache, 0, [], [], summary)
            tcache.mark_complete(cache, 1, {"source": "s"})
        except Exception as err:  # noqa: BLE001 - reported to the parent, which asserts there were none
            errors.put(f"{type(err).__name__}: {err}")


def test_two_writers_of_one_cache_entry_at_once_never_collide(tmp_path) -> None:
    """Two builds on one cache write the same part at the same moment: each through its own temporary file."""
    import multiprocessing

    from mlan.mixture import cache as tcache

    ctx = multiprocessing.get_context("fork")
    barrier, errors = ctx.Barrier(2), ctx.Queue()
    cache = str(tmp_path / "cache" / "entry")
    procs = [ctx.Process(target=_write_part_repeatedly, args=(cache, barrier, 40, errors)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    found = []
    while not errors.empty():
        found.append(errors.get())
    assert [p.exitcode for p in procs] == [0, 0] and found == []
    assert tcache.read_part(cache, 0).num_rows == 0 and tcache.read_complete(cache) == {"parts": 1, "source": "s"}
    assert sorted(p.name for p in (tmp_path / "cache" / "entry").iterdir()) == [
        "_SUCCESS", "part-000000.json", "part-000000.parquet"]


def _hold_cache_lock(cache_root: str, held, seconds: float) -> None:
    from mlan.mixture import cache as tcache

    with tcache.cache_lock(cache_root):
        held.set()
        time.sleep(seconds)


def test_a_second_build_waits_for_the_cache_lock(tmp_path, capsys) -> None:
    import multiprocessing

    from mlan.mixture import cache as tcache

    ctx = multiprocessing.get_context("fork")
    held = ctx.Event()
    holder = ctx.Process(target=_hold_cache_lock, args=(str(tmp_path), held, 1.5))
    holder.start()
    assert held.wait(60)
    t0 = time.monotonic()
    with tcache.cache_lock(str(tmp_path)):
        waited = time.monotonic() - t0
    holder.join(timeout=60)
    assert waited > 0.5 and holder.exitcode == 0
    assert f"{tmp_path}: waiting for `mlan build`" in capsys.readouterr().err
