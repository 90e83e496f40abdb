"""Issue 12: every command fails cleanly (one line, exit 2), leaves nothing running, trains only on verified data.

Commands run as real `python -m mlan.cli` processes (their stderr and exit status are the contract); the
training runs are real torchrun + gloo workers on the tiny LLaVA over shardkit builds.
"""
from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mlan.errors import MlanError, WeightsError, one_line
from mlan.merge import read_checkpoint
from mlan.train import checkpoint as ckpt
from mlan.train.run_folder import remove_unfinished
from mlan.train.state import ModelState, OptimizerState
from mlan.weights import check_model_dir, read_safetensors_header

sys.path.insert(0, str(Path(__file__).parents[1]))
import shardkit

REPO = Path(__file__).resolve().parents[2]
TINY_RECIPE = """
model: {family: llava, config: tiny}
train:
  lr: 3.0e-3
  warmup_ratio: 0.1
  batch_rows: 1
  grad_accum: 1
  loader_workers: 0
  budget_tokens: 700
  checkpoint_every_tokens: 150
"""


def mlan(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "mlan.cli", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=timeout, check=False)


def assert_one_line_error(res: subprocess.CompletedProcess, command: str, *needles: str) -> str:
    """Exit 2, exactly one line on stderr (`mlan CMD: error: …`), no traceback; returns the line."""
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2, (res.returncode, res.stderr[-3000:])
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    assert len(lines) == 1, res.stderr[-3000:]
    assert lines[0].startswith(f"mlan {command}: error: "), lines
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> Path:
    """A 24-row tiny-LLaVA build (3 shards) and its recipe, in ROOT/build and ROOT/recipe.yaml."""
    root = tmp_path_factory.mktemp("faults")
    rows = shardkit.random_rows(24, seed=3, family_config=shardkit.LLAVA_FC)
    shardkit.write_build(root / "build", rows, shardkit.LLAVA_FC, seq_len=64, rows_per_shard=8)
    (root / "recipe.yaml").write_text(TINY_RECIPE)
    return root


def _copy_build(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------- item 3: every command, a missing input
def _missing_source_recipe(tmp: Path) -> Path:
    recipe = tmp / "missing-source.yaml"
    (tmp / "here.json").write_text(json.dumps([{"instruction": "Say hi.", "input": "", "output": "Hi."}]))
    recipe.write_text(f"""
model: {{family: llava, config: tiny}}
sources:
  - {{name: here, path: {tmp / 'here.json'}, format: alpaca, modality: text}}
  - {{name: typo, path: {tmp / 'no-such-file.json'}, format: alpaca, modality: text}}
mixture: {{budget: {{tokens: 2000}}, ratio: {{text: 1.0}}, seq_len: 256}}
""")
    return recipe


def _missing_cases(tmp: Path, build: Path) -> list[tuple[str, list[str], str]]:
    nope = str(tmp / "nope")
    task = tmp / "task.jsonl"
    task.write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n")
    recipe = _missing_source_recipe(tmp)
    return [
        ("render", ["render", str(recipe), "--source", "typo"], "no-such-file.json"),
        ("build", ["build", str(recipe), "--out", str(tmp / "b")], "no-such-file.json"),
        ("verify", ["verify", nope], nope),
        ("inspect", ["inspect", nope], nope),
        ("train", ["train", str(build / "recipe.yaml"), "--shards", nope, "--out", str(tmp / "r")], nope),
        ("train", ["train", nope + ".yaml", "--shards", str(build / "build"), "--out", str(tmp / "r")], nope),
        ("eval", ["eval", nope, "--tasks", str(task)], nope),
        ("merge", ["merge", "--vlm", nope, "--llm", nope, "--alpha", "0.5", "--out", str(tmp / "m")], nope),
        ("merge-sweep", ["merge-sweep", "--vlm", nope, "--llm", nope, "--alphas", "0.5", "--densities", "1",
                         "--tasks", str(task), "--out", str(tmp / "ms")], nope),
        ("ablate", ["ablate", nope + ".yaml", "--ratios", "0,1", "--out", str(tmp / "a")], nope),
        ("demo", ["demo", "--out", "/proc/nope/demo"], "/proc/nope"),
    ]


def _timed_mlan(args: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.perf_counter()
    return mlan(*args), time.perf_counter() - t0


def test_every_command_on_a_missing_input_is_one_line_exit_2(build, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    cases = _missing_cases(tmp_path, build)
    # one process per command (its stderr and status are the contract), two at a time: most of each is the
    # single-threaded interpreter and import start-up, which a second core overlaps
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(_timed_mlan, [args for _, args, _ in cases]))
    for (command, _, needle), (res, seconds) in zip(cases, results):
        line = assert_one_line_error(res, command, needle)
        if command == "build":  # the source check comes before Ray starts (and before --out is created)
            assert not (tmp_path / "b").exists() and seconds < 60, line


def test_error_messages_are_one_line_whatever_wrapped_them():
    wrapped = ("Caught ShardError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
               '  File "x.py", line 1, in f\nmlan.data.loader.ShardError: shards/s.tar: row \'k\': cannot read')
    assert one_line(MlanError(wrapped)) == "shards/s.tar: row 'k': cannot read"
    assert one_line(MlanError("a\nb")) == "a; b"


def test_inspect_into_a_closed_pipe_ends_quietly(build):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "mlan.cli", "inspect", str(build / "build")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdout.close()  # `| head` that has already read what it wanted
    err = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert proc.returncode == 128 + signal.SIGPIPE, (proc.returncode, err)


# ---------------------------------------------------------------- item 3: hostile model files
def _tiny_safetensors(path: Path) -> Path:
    save_file({"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}, str(path))
    return path


def _with_header(path: Path, header: bytes, length: int | None = None) -> Path:
    path.write_bytes(struct.pack("<Q", len(header) if length is None else length) + header + b"\0" * 24)
    return path


def test_safetensors_header_is_bounded_and_type_checked(tmp_path):
    good = _tiny_safetensors(tmp_path / "good.safetensors")
    raw, header = read_safetensors_header(good)
    assert header["w"]["shape"] == [2, 3] and raw[8:] == good.read_bytes()[8:len(raw)]
    cases = {
        "huge": (b"{}", 2 ** 62, "length field"),
        "list": (b"[1, 2]", None, "not an object"),
        "entry": (b'{"w": "x"}', None, "entry is a str"),
        "offsets": (b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4096]}}', None, "data_offsets"),
        "shape": (b'{"w": {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}}', None, "shape"),
        "json": (b"{not json", None, "not JSON"),
    }
    for name, (header_bytes, length, needle) in cases.items():
        bad = _with_header(tmp_path / f"{name}.safetensors", header_bytes, length)
        with pytest.raises(WeightsError, match=needle) as err:
            read_safetensors_header(bad)
        assert str(bad) in str(err.value)


def test_merge_on_hostile_safetensors_is_one_line(tmp_path):
    vlm, llm = tmp_path / "vlm", tmp_path / "llm"
    for d in (vlm, llm):
        d.mkdir()
        (d / "config.json").write_text("{}")
    _tiny_safetensors(llm / "model.safetensors")
    _with_header(vlm / "model.safetensors", b"{}", 2 ** 62)  # MemoryError when trusted
    line = assert_one_line_error(mlan("merge", "--vlm", str(vlm), "--llm", str(llm), "--alpha", "0.5",
                                      "--out", str(tmp_path / "out")), "merge", "model.safetensors")
    assert "length field" in line
    _with_header(vlm / "model.safetensors", b'{"w": [1, 2]}')  # TypeError when trusted
    assert_one_line_error(mlan("merge", "--vlm", str(vlm), "--llm", str(llm), "--alpha", "0.5",
                               "--out", str(tmp_path / "out")), "merge", "'w'")
    with pytest.raises(WeightsError):
        read_checkpoint(vlm)


class _Payload:
    """Unpickling this runs `open(marker, "w")`: proof that a loader unpickled the file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_weights_are_refused_never_unpickled(tmp_path):
    import pickle

    from transformers import LlamaConfig

    model = tmp_path / "model"
    model.mkdir()
    LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                num_attention_heads=1, num_key_value_heads=1).save_pretrained(model)
    marker = tmp_path / "unpickled"
    (model / "pytorch_model.bin").write_bytes(pickle.dumps({"w": _Payload(marker)}))
    with pytest.raises(WeightsError, match="safetensors only"):
        check_model_dir(model)
    task = tmp_path / "task.jsonl"
    task.write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n")
    line = assert_one_line_error(mlan("eval", str(model), "--tasks", str(task)), "eval", "pytorch_model.bin")
    assert "safetensors only" in line and not marker.exists()
    _with_header(model / "model.safetensors", b"[]")  # a corrupt header next to it: named, not loaded
    assert_one_line_error(mlan("eval", str(model), "--tasks", str(task)), "eval", "model.safetensors")


# ---------------------------------------------------------------- item 4: one writer per folder
def test_a_held_lock_refuses_a_second_build_and_train(build, tmp_path, shared_data):
    from mlan.run_lock import RunLock

    recipe = REPO / "recipes" / "tiny-llava.yaml"
    out = tmp_path / "out"
    with RunLock(out, "build"):
        t0 = time.perf_counter()
        line = assert_one_line_error(mlan("build", str(recipe), "--out", str(out), "--workers", "1",
                                          "--set", "mixture.budget.tokens=3000"), "build", str(out))
        assert f"pid {os.getpid()}" in line and "mlan build" in line
        line = assert_one_line_error(mlan("train", str(build / "recipe.yaml"), "--shards", str(build / "build"),
                                          "--out", str(out)), "train", str(out))
        assert f"pid {os.getpid()}" in line
        assert time.perf_counter() - t0 < 120  # refused at once: no Ray, no torchrun
    assert not (out / "manifest.json").exists() and not (out / "checkpoints").exists()


def test_lock_of_a_dead_process_is_taken_over_with_a_notice(tmp_path, capsys):
    from mlan.run_lock import LOCK_FILE, RunLock

    code = ("import sys, time; from mlan.run_lock import RunLock; RunLock(sys.argv[1], 'build').acquire(); "
            "print('held', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(MlanError, match=f"pid {holder.pid}"):
            RunLock(tmp_path, "train").acquire()
    finally:
        holder.kill()
        holder.wait()
    lock = RunLock(tmp_path, "train").acquire()
    try:
        assert lock.took_over is not None and lock.took_over["pid"] == holder.pid
        assert f"pid {holder.pid}" in capsys.readouterr().err
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    finally:
        lock.release()
    assert not (tmp_path / LOCK_FILE).exists()
    with RunLock(tmp_path, "build") as again:  # released cleanly: no takeover, no notice
        assert again.took_over is None


def test_a_second_run_waits_for_a_stopped_holder_to_finish_shutting_down(tmp_path, capsys):
    """A killed ablation's build child gets SIGTERM and takes seconds to stop Ray; a rerun started at once
    waits for it (one notice) instead of refusing the folder it is about to give up."""
    from mlan.run_lock import RunLock

    code = ("import sys, time; from mlan.cli import stop_signals_raise; from mlan.run_lock import RunLock; "
            "stop_signals_raise(); lock = RunLock(sys.argv[1], 'build').acquire(); print('held', flush=True)\n"
            "try:\n    time.sleep(600)\nfinally:\n    time.sleep(3); lock.release()")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        assert holder.stdout.readline().strip() == "held"
        holder.send_signal(signal.SIGTERM)
        time.sleep(0.5)  # the holder has marked its lock as stopping and is in its slow `finally`
        t0 = time.monotonic()
        with RunLock(tmp_path, "build") as lock:
            assert time.monotonic() - t0 > 1.5 and lock.took_over is None  # it waited out the 3 s shutdown
        assert holder.wait(timeout=30) != 0  # it ended by the signal, after its `finally`
        err = capsys.readouterr().err
        assert f"waiting for the stopped `mlan build` (pid {holder.pid}" in err
    finally:
        holder.kill()
        holder.wait()


# ---------------------------------------------------------------- item 2: verified data only
def test_train_refuses_a_flipped_byte_before_any_worker(build, tmp_path):
    bad = _copy_build(build / "build", tmp_path / "bad")
    shard = bad / "shards" / "shard-000001.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 1
    shard.write_bytes(bytes(data))
    t0 = time.perf_counter()
    res = mlan("train", str(build / "recipe.yaml"), "--shards", str(bad), "--out", str(tmp_path / "run"),
               "--nproc", "2")
    assert_one_line_error(res, "train", "shards/shard-000001.tar", "sha256")
    assert not (tmp_path / "run").exists() and time.perf_counter() - t0 < 60


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_train_on_a_truncated_shard_without_verify_stops_with_one_line(build, tmp_path):
    bad = _copy_build(build / "build", tmp_path / "trunc")
    os.truncate(bad / "shards" / "shard-000002.tar", 3000)
    res = mlan("train", str(build / "recipe.yaml"), "--shards", str(bad), "--out", str(tmp_path / "run"),
               "--nproc", "2", "--no-verify")
    errors = [ln for ln in res.stderr.splitlines() if "error" in ln.lower() or "Error" in ln]
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr and "[rank" not in res.stderr, res.stderr[-3000:]
    assert len(errors) == 1 and errors[0].startswith("mlan train: error: shards/shard-000002.tar"), errors


# ---------------------------------------------------------------- item 1: nothing left running
# (a killed `mlan train`, SIGTERM and SIGKILL: test_train's test_sigterm_then_sigkill_then_resume_equals_uninterrupted)
def _alive(pids: set[int]) -> set[int]:
    alive = set()
    for p in pids:
        try:
            state = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.add(p)
    return alive


def test_reaper_ends_what_a_killed_parent_left_running(tmp_path):
    """`mlan build`'s reaper: a grandchild in a session of its own (like Ray's agents) dies with the parent."""
    code = ("import subprocess, sys, time\n"
            "from mlan.child_process import start_descendant_reaper\n"
            "start_descendant_reaper()\n"
            "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], start_new_session=True)\n"
            "print(g.pid, flush=True)\n"
            "time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=str(REPO)))
    grandchild = int(parent.stdout.readline())
    try:
        time.sleep(1.0)  # the reaper has seen the grandchild
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 10
        while _alive({grandchild}) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive({grandchild}), "the grandchild outlived its killed parent by 10 s"
    finally:
        if _alive({grandchild}):
            os.kill(grandchild, signal.SIGKILL)


def test_a_step_folder_left_by_a_killed_run_never_blocks_a_save(tmp_path):
    """The issue's `OSError: Directory not empty: step-N.tmp -> step-N`: the step is replaced."""
    import torch.distributed as dist

    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        model = torch.nn.Linear(3, 2)
        opt = torch.optim.AdamW(model.parameters())
        run = tmp_path / "run"
        stale = ckpt.checkpoint_dir(run, 6)
        stale.mkdir(parents=True)
        (stale / "junk").write_text("from the killed run")
        half = stale.with_name(stale.name + ".tmp")
        half.mkdir()
        (half / "junk").write_text("half-written")
        final = ckpt.save_checkpoint(run, 6, {"model": ModelState(model), "optim": OptimizerState(model, opt)})
        assert final == stale and not (final / "junk").exists() and (final / ".metadata").is_file()
        assert ckpt.latest_checkpoint(run) == final
        (run / "checkpoints" / "step-00000007.tmp").mkdir()
        assert [p.name for p in remove_unfinished(run)] == ["step-00000007.tmp"]
        assert ckpt.latest_checkpoint(run) == final
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------- item 5: the FSDP2 view warning
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_fsdp2_gradients_equal_unsharded_and_no_view_warning(tmp_path):
    out = tmp_path / "grads.json"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          str(Path(__file__).parents[1] / "fsdp_grad_check.py"), str(out)],
                         capture_output=True, text=True, env=env, timeout=280, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(out.read_text())
    assert got["n_params"] > 10 and got["max_abs_grad"] > 1e-3
    assert got["max_abs_diff"] <= 1e-6 * max(1.0, got["max_abs_grad"]), got
    assert got["view_warnings"] == 0, got
    assert "returned a view tensor" not in res.stderr


# ---------------------------------------------------------------- tools/chaos.py, short
@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_chaos_short(shared_data, tmp_path):
    """One seeded SIGKILL of `mlan eval` through tools/chaos.py (a tiny untrained LLaVA): the rerun's results are
    identical, nothing is left running. The tool's other kills are what dedicated tests do: a killed build
    (test_build's test_address_build_sigkill_resume_is_byte_identical), train (test_train's
    test_sigterm_then_sigkill_then_resume_equals_uninterrupted), merge (test_hostile_faults'
    test_merge_killed_after_its_first_file_reruns_to_the_uninterrupted_result), continual (test_chaos',
    test_continual's) and ablation (test_help's demo run). Every command at 10 kills: `python tools/chaos.py --kills 10`."""
    env = dict(os.environ, PYTHONPATH=str(REPO), MLAN_SHARED_DATA=str(shared_data))
    res = subprocess.run([sys.executable, str(REPO / "tools" / "chaos.py"), "--kills", "1", "--seed", "1",
                          "--commands", "eval", "--work", str(tmp_path)],
                         capture_output=True, text=True, env=env, timeout=3500, check=False)
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    table = res.stdout.split("chaos: ")[-1]
    rows = {ln.split("|")[1].strip(): ln for ln in table.splitlines() if ln.startswith("| mlan")}
    assert list(rows) == ["mlan eval"], table
    for name, row in rows.items():
        cells = [c.strip() for c in row.split("|")[1:-1]]
        assert cells[1] == "1/1" and cells[2].startswith("1/1 ") and cells[3] == "0", (name, table)
