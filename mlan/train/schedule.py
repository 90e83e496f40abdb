"""Learning rate as a function of consumed tokens (warmup + cosine), so a budget, not a step count, defines it.

The schedule is checkpointed (a DCP Stateful by shape: `state_dict` / `load_state_dict`): a resumed run
continues the schedule it started with, and refuses one whose settings differ.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from mlan.errors import TrainError

STAGE_LR = {"stage1": 1e-3, "stage2": 2e-5, "custom": 2e-5}


@dataclass(frozen=True)
class TokenSchedule:
    """Linear warmup over `warmup_ratio`·budget tokens, then cosine down to `min_lr_ratio`·lr at the budget."""

    lr: float
    budget_tokens: int
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0

    @property
    def warmup_tokens(self) -> float:
        return self.warmup_ratio * self.budget_tokens

    def at(self, tokens: float) -> float:
        """LR at a token position (the trainer passes the step's midpoint: never 0 on the first or last step)."""
        t = min(max(tokens, 0.0), float(self.budget_tokens))
        warm = self.warmup_tokens
        if warm > 0 and t < warm:
            return self.lr * t / warm
        span = self.budget_tokens - warm
        progress = (t - warm) / span if span > 0 else 1.0
        floor = self.min_lr_ratio * self.lr
        return floor + (self.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def for_step(self, tokens_before: int, step_tokens: int) -> float:
        return self.at(tokens_before + step_tokens / 2)

    def state_dict(self) -> dict[str, float | int]:
        return {"lr": self.lr, "budget_tokens": self.budget_tokens, "warmup_ratio": self.warmup_ratio,
                "min_lr_ratio": self.min_lr_ratio}

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        """A frozen schedule is restored by checking it: the run's settings must give the checkpointed one."""
        mine = self.state_dict()
        differ = [f"{k} {state[k]} (now {mine[k]})" for k in mine if state.get(k) != mine[k]]
        if differ:
            raise TrainError(f"the checkpoint's LR schedule differs from this run's: {', '.join(differ)}; "
                             "resume with the train.lr / warmup_ratio / min_lr_ratio / budget_tokens it started with")
