"""What a checkpoint holds, as `torch.distributed.checkpoint` Stateful objects: DCP asks each for its
`state_dict()` when saving and hands the loaded values to its `load_state_dict()` when resuming.

Keys: `model` and `optim` (sharded), `train` (step and token counters), `schedule` (the LR schedule: a resumed
run continues it exactly or refuses) and, per rank, `rank<r>` (the loader cursor and every RNG).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

from mlan.errors import TrainError
from mlan.train.checkpoint import rng_state, set_rng_state
from mlan.train.schedule import TokenSchedule


@dataclass
class TrainState:
    """What the loop carries from step to step."""

    step: int = 0
    tokens: int = 0
    tokens_text: int = 0
    tokens_image_text: int = 0
    loss_tokens: int = 0

    def state_dict(self) -> dict[str, int]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for f in fields(self):
            setattr(self, f.name, int(state[f.name]))


class ModelState:
    """The model's (sharded) parameters."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        return get_model_state_dict(self.model)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_model_state_dict(self.model, state)


class OptimizerState:
    """The optimizer's (sharded) moments and step counts, keyed by parameter name."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        return get_optimizer_state_dict(self.model, self.optimizer)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, state)


class Resumable(Protocol):
    """A loader whose cursor is a JSON-serialisable dict (mlan.data.loader)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class RankState:
    """This rank's loader cursor (as JSON: ranks hold different shapes) and RNG states."""

    def __init__(self, loader: Resumable) -> None:
        self.loader = loader

    def state_dict(self) -> dict[str, Any]:
        return {"loader": json.dumps(self.loader.state_dict()), "rng": rng_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A cursor taken over other shards (a changed fingerprint), ranks, batch size or seed is one TrainError."""
        set_rng_state(state["rng"])
        try:
            self.loader.load_state_dict(json.loads(state["loader"]))
        except (ValueError, KeyError, TypeError) as err:
            raise TrainError(f"{err}: the checkpoint was taken over other shards or settings; resume with the same "
                             "--shards, recipe and --nproc, or train into a new --out") from None


def run_state(model: nn.Module, optimizer: torch.optim.Optimizer, train: TrainState, schedule: TokenSchedule,
              loader: Resumable) -> dict[str, Stateful]:
    """Everything a checkpoint saves and a resume restores, under the keys the DCP folder holds."""
    return {"model": ModelState(model), "optim": OptimizerState(model, optimizer), "train": train,
            "schedule": schedule, f"rank{dist.get_rank()}": RankState(loader)}
