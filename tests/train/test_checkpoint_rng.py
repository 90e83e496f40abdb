"""The RNG state in a checkpoint round-trips exactly and is parsed, never evaluated."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from mlan.train.checkpoint import rng_state, set_rng_state


def _draws() -> tuple:
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def test_rng_state_round_trip_continues_every_stream() -> None:
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    _draws()
    state = rng_state()
    expected = [_draws() for _ in range(3)]
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    set_rng_state(state)
    assert [_draws() for _ in range(3)] == expected


def test_python_rng_state_is_never_evaluated(tmp_path) -> None:
    marker = tmp_path / "ran"
    state = rng_state()
    state["python"] = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    with pytest.raises(ValueError, match="Python RNG state"):
        set_rng_state(state)
    assert not marker.exists()
