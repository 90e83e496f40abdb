"""Training telemetry: peak memory, the loader's share of step time, MFU, and the offline trackers.

Each tracker's values are read back from what it wrote (TensorBoard event files through tensorboard's own
reader, MLflow's file store through a fresh MlflowClient, W&B's offline transaction log through a reader of its
record format written here) and compared with metrics.jsonl. A real one-rank training run (`python -m
mlan.commands.train_worker`, gloo, tiny LLaVA) checks the new metrics.jsonl keys and the trackers end to end.
"""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch

from mlan.train import metrics
from mlan.train.metrics import GIB, MetricsLog, peak_flops, peak_memory_bytes, read_metrics, step_telemetry
from mlan.train.trackers import TRACKERS, TrackerError, make_trackers

sys.path.insert(0, str(Path(__file__).parents[1]))
import shardkit

REPO = Path(__file__).resolve().parents[2]
RECORDS = [
    {"step": 1, "tokens": 100, "loss": 2.5, "lr": 1e-3, "grad_norm": 0.75, "tokens_per_s": 1000.0,
     "peak_memory_gib": 1.5, "data_wait_fraction": 0.25, "text_only_microbatches": 0},
    {"step": 2, "tokens": 220, "loss": 2.0, "lr": 5e-4, "grad_norm": 0.5, "tokens_per_s": 1200.0,
     "peak_memory_gib": 1.625, "data_wait_fraction": 0.125, "text_only_microbatches": 1},
]


# ---------------------------------------------------------------- telemetry values
def test_cpu_peak_memory_is_the_process_peak_rss():
    before = peak_memory_bytes(torch.device("cpu"))
    assert before >= psutil.Process().memory_info().rss * 0.9 > 0  # a peak is at least the current RSS
    block = torch.ones(300 << 20, dtype=torch.uint8)  # 300 MiB, every page touched
    after = peak_memory_bytes(torch.device("cpu"))
    assert after >= psutil.Process().memory_info().rss * 0.9
    assert after - before >= 0 and after >= 300 << 20
    del block


def test_step_telemetry_fraction_and_units():
    t = step_telemetry(torch.device("cpu"), wait_s=0.5, step_s=1.5)
    assert t["data_wait_fraction"] == 0.25
    assert t["peak_memory_gib"] == pytest.approx(peak_memory_bytes(torch.device("cpu")) / GIB, rel=0.05)
    assert step_telemetry(torch.device("cpu"), 0.0, 0.0)["data_wait_fraction"] == 0.0


def test_peak_flops_table_and_override():
    assert peak_flops(torch.device("cpu")) is None  # no MFU on CPU unless the recipe gives a peak
    assert peak_flops(torch.device("cpu"), 2e12) == 2e12
    for gpu in ("A100", "H100", "H200", "L40S"):
        assert metrics.PEAK_BF16_FLOPS[gpu] > 1e14
    assert metrics.PEAK_BF16_FLOPS["H100"] == 989e12 and metrics.PEAK_BF16_FLOPS["A100"] == 312e12


# ---------------------------------------------------------------- readers of what the trackers wrote
def read_tensorboard(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def read_mlflow(run_dir: Path, key: str) -> list[tuple[int, float]]:
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3: the file store is opt-in, as in trackers.py
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(run_dir.resolve() / "mlflow").as_uri())
    exp = client.get_experiment_by_name("mlan")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == run_dir.name
    return [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]


def read_wandb(run_dir: Path) -> list[dict]:
    """History rows of the offline run: its `.wandb` file is a LevelDB-style log (7-byte `:W&B` header, 32 KiB
    blocks of records: crc32 u32, length u16, type u8 FULL/FIRST/MIDDLE/LAST) of protobuf `Record`s."""
    from wandb.proto import wandb_internal_pb2

    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    raw = path.read_bytes()
    assert raw[:4] == b":W&B"
    rows, pos, chunks = [], 7, []
    while pos + 7 <= len(raw):
        left = 32768 - pos % 32768
        if left < 7:  # the block's tail is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunks.append(raw[pos + 7:pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: one record complete
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(chunks))
            chunks = []
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return rows


def check_trackers_hold(run_dir: Path, lines: list[dict], keys: tuple[str, ...]) -> None:
    """Every tracker under run_dir holds each key of every metrics.jsonl line, against the line's tokens."""
    want = {k: [(r["tokens"], r[k]) for r in lines] for k in keys}
    tb = read_tensorboard(run_dir / "tensorboard")
    wb = read_wandb(run_dir)
    for k in keys:
        assert [(s, pytest.approx(v, rel=1e-6)) for s, v in want[k]] == tb[k], k  # TB stores float32
        assert read_mlflow(run_dir, k) == want[k], k
        assert [(row["_step"], row[k]) for row in wb] == want[k], k


def test_every_tracker_reads_back_what_metrics_log_wrote(tmp_path):
    run = tmp_path / "run-a"
    log = MetricsLog(run / "metrics.jsonl", trackers=make_trackers(TRACKERS, run, {"train.lr": 1e-3}))
    for record in RECORDS:
        log.write(record)
    log.close()
    lines = read_metrics(run / "metrics.jsonl")
    assert lines == RECORDS
    check_trackers_hold(run, lines, ("loss", "lr", "grad_norm", "peak_memory_gib", "data_wait_fraction",
                                     "text_only_microbatches"))
    tb = read_tensorboard(run / "tensorboard")
    assert "step" not in tb and "tokens" not in tb  # the x-axis, not a series


def test_unknown_tracker_is_a_user_error(tmp_path):
    with pytest.raises(TrackerError, match=r"train.trackers: unknown \['neptune'\]"):
        make_trackers(["mlflow", "neptune"], tmp_path)


# ---------------------------------------------------------------- a real training run
RECIPE = """
model: {family: llava, config: tiny}
train:
  lr: 3.0e-3
  batch_rows: 1
  loader_workers: 0
  peak_flops: 1.0e+12
  trackers: [mlflow, wandb]
  tensorboard: true
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_training_run_writes_telemetry_and_trackers(tmp_path):
    from mlan.families import modeling
    from mlan.recipe import ModelSpec

    rows = shardkit.random_rows(6, seed=5, family_config=shardkit.LLAVA_FC)
    shardkit.write_build(tmp_path / "build", rows, shardkit.LLAVA_FC, seq_len=64, rows_per_shard=6)
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    run = tmp_path / "run-t"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, "-m", "mlan.commands.train_worker", str(tmp_path / "recipe.yaml"), "--shards",
                           str(tmp_path / "build"), "--out", str(run)], check=False, env=env, capture_output=True,
                          text=True,
                          timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = read_metrics(run / "metrics.jsonl")
    assert len(lines) >= 3
    per_token = modeling.flops_model(modeling.build_model(ModelSpec(family="llava"), shardkit.LLAVA_FC)).per_token(64)
    for r in lines:
        assert 0.05 < r["peak_memory_gib"] < 64  # the worker's peak RSS: a torch process, not zero, not absurd
        assert 0.0 <= r["data_wait_fraction"] < 1.0
        assert r["mfu"] == pytest.approx(per_token * r["tokens_per_s"] / 1e12, rel=1e-9)  # train.peak_flops
    check_trackers_hold(run, lines, ("loss", "mfu", "peak_memory_gib", "data_wait_fraction"))


def test_a_missing_tracker_package_is_one_recipe_error(tmp_path):
    """In a process where `wandb` cannot be imported, the error names the extra (and is a RecipeError: exit 2)."""
    code = ("import sys; sys.modules['wandb'] = None\n"
            "from mlan.recipe import RecipeError\n"
            "from mlan.train.trackers import make_trackers\n"
            "try:\n    make_trackers(['wandb'], __import__('pathlib').Path(sys.argv[1]))\n"
            "except RecipeError as err:\n    print(err)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=False,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("train.trackers: 'wandb' needs the `wandb` package (pip install 'mlan[wandb]')")
