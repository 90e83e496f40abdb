"""A checkpoint restores every Stateful of a run (model, optimizer, train counters, LR schedule, loader cursor,
RNG) exactly, and a run whose schedule differs from the checkpointed one refuses to resume (one process, gloo,
a real loader over a real tar build)."""
from __future__ import annotations

import random

import numpy as np
import pytest
import shardkit
import torch
import torch.distributed as dist
from torch import nn

from mlan.data.loader import make_loader
from mlan.errors import TrainError
from mlan.train import checkpoint as ckpt
from mlan.train.schedule import TokenSchedule
from mlan.train.state import TrainState, run_state


@pytest.fixture
def world_of_one():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _run_parts(build, lr: float = 1e-3) -> tuple:
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    loader = make_loader(str(build), 0, 1, batch_rows=2, workers=0, seed=5)
    return model, opt, TrainState(), TokenSchedule(lr=lr, budget_tokens=1000, warmup_ratio=0.1), loader


def _keys(batch: dict) -> list[str]:
    return list(batch["meta"]["keys"])


def test_resume_restores_every_stateful_exactly(tmp_path, world_of_one) -> None:
    build = shardkit.write_build(tmp_path / "build", shardkit.random_rows(12, seed=1, family_config=shardkit.LLAVA_FC),
                                 shardkit.LLAVA_FC, seq_len=64, rows_per_shard=4)
    model, opt, state, schedule, loader = _run_parts(build)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    it = iter(loader)
    next(it)
    state.step, state.tokens, state.tokens_text, state.loss_tokens = 3, 321, 200, 77
    random.seed(11)
    ckpt.save_checkpoint(tmp_path / "run", 3, run_state(model, opt, state, schedule, loader))
    expected = {"batch": _keys(next(it)), "random": random.random(), "weights": model.weight.detach().clone(),
                "exp_avg": opt.state[model.weight]["exp_avg"].clone()}

    model2, opt2, state2, schedule2, loader2 = _run_parts(build)
    random.seed(99)
    ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "run"), run_state(model2, opt2, state2, schedule2, loader2))
    assert state2 == state and schedule2 == schedule
    assert _keys(next(iter(loader2))) == expected["batch"]  # the cursor continues after the consumed batch
    assert random.random() == expected["random"]
    assert torch.equal(model2.weight, expected["weights"])
    assert torch.equal(opt2.state[model2.weight]["exp_avg"], expected["exp_avg"])
    assert not np.array_equal(expected["weights"].numpy(), nn.Linear(4, 3).weight.detach().numpy())


def test_resume_with_another_schedule_is_refused(tmp_path, world_of_one) -> None:
    build = shardkit.write_build(tmp_path / "build", shardkit.random_rows(4, seed=1, family_config=shardkit.LLAVA_FC),
                                 shardkit.LLAVA_FC, seq_len=64, rows_per_shard=4)
    model, opt, state, schedule, loader = _run_parts(build, lr=1e-3)
    ckpt.save_checkpoint(tmp_path / "run", 1, run_state(model, opt, state, schedule, loader))
    model2, opt2, state2, schedule2, loader2 = _run_parts(build, lr=2e-3)
    with pytest.raises(TrainError, match=r"LR schedule differs.*lr 0.001 \(now 0.002\)"):
        ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "run"),
                             run_state(model2, opt2, state2, schedule2, loader2))
