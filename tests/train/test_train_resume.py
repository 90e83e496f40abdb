"""A run stopped after a checkpoint and resumed continues exactly: the same per-step LR (the checkpointed schedule),
losses and token counts, and the same final weights as an uninterrupted run (one rank in this process, gloo, a
tiny LLaVA on a real tar build). The stop is an exception from the loader after a few batches."""
from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import shardkit
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from mlan.data.loader import make_loader
from mlan.recipe import TrainSpec
from mlan.train.metrics import read_metrics
from mlan.train.parallel import DistEnv
from mlan.train.trainer import train

RECIPE = """
model: {family: llava, config: tiny}
train:
  lr: 3.0e-3
  warmup_ratio: 0.3
  min_lr_ratio: 0.1
  batch_rows: 1
  grad_accum: 1
  loader_workers: 0
"""
OVERRIDES = ["train.budget_tokens=400", "train.checkpoint_every_tokens=120"]


class StopsAfter:
    """The real loader of this rank, cut off (as by a kill) when the run asks for batch `n + 1`."""

    def __init__(self, build: Path, env: DistEnv, n: int) -> None:
        self.loader = make_loader(str(build), rank=env.rank, world_size=env.world_size, batch_rows=1, workers=0,
                                  seed=TrainSpec().seed)  # the recipe's (default) seed, as the trainer's loader
        self.n = n

    def __iter__(self) -> Iterator[dict]:
        for i, batch in enumerate(self.loader):
            if i == self.n:
                raise RuntimeError("stopped")
            yield batch

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)


@pytest.fixture
def one_rank(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(key, value)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def _run(recipe: Path, build: Path, out: Path, resume: bool = False, factory=None) -> None:
    try:
        train(str(recipe), str(build), str(out), resume=resume, overrides=OVERRIDES, batches_factory=factory,
              verify=False)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_stopped_then_resumed_run_equals_uninterrupted(tmp_path, one_rank) -> None:
    build = shardkit.write_build(tmp_path / "build", shardkit.random_rows(16, seed=3, family_config=shardkit.LLAVA_FC),
                                 shardkit.LLAVA_FC, seq_len=64, rows_per_shard=8)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    _run(recipe, build, tmp_path / "whole")
    stopped = tmp_path / "stopped"
    with pytest.raises(RuntimeError, match="stopped"):
        _run(recipe, build, stopped, factory=lambda env: StopsAfter(build, env, n=5))
    assert list((stopped / "checkpoints").glob("step-*")) and not (stopped / "final").exists()
    _run(recipe, build, stopped, resume=True)
    ref, got = read_metrics(tmp_path / "whole" / "metrics.jsonl"), read_metrics(stopped / "metrics.jsonl")
    assert len(ref) > 5 and [r["step"] for r in got] == [r["step"] for r in ref]
    assert [r["tokens"] for r in got] == [r["tokens"] for r in ref] and got[-1]["tokens"] == 400
    assert [r["lr"] for r in got] == [r["lr"] for r in ref]
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in ref], rel=1e-6)
    wa, wb = load_file(str(tmp_path / "whole" / "final" / "model.safetensors")), \
        load_file(str(stopped / "final" / "model.safetensors"))
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= 1e-6
    assert any(not torch.equal(wa[k], torch.zeros_like(wa[k])) for k in wa)
