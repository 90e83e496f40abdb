"""Per-step metrics: `RUN/metrics.jsonl` (one JSON line per optimizer step), progress (mlan.progress), trackers.

Keys: step, tokens (cumulative sequence tokens), tokens_text, tokens_image_text, loss, lr, grad_norm,
tokens_per_s, peak_memory_gib, data_wait_fraction, and mfu where the accelerator's peak is known. Only rank 0
writes; the numeric keys also go to the recipe's trackers (`mlan.train.trackers`), against tokens.
"""
from __future__ import annotations

import json
import resource
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mlan import progress
from mlan.train.trackers import Tracker

# dense bf16 peak FLOP/s per GPU (no sparsity), by device-name substring; the first match wins (H100 NVL and
# PCIe are slower than SXM: set train.peak_flops for those)
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}
GIB = 1 << 30


def peak_flops(device: torch.device, override: float | None = None) -> float | None:
    """`train.peak_flops` if set, else the GPU's dense bf16 peak, else None (CPU, unknown GPU): then no MFU."""
    if override:
        return float(override)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak window (CUDA); the CPU's peak RSS cannot be reset, so it stays the process's peak."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA: the most memory tensors held since `reset_peak_memory` (max allocated). CPU: the process's peak RSS."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # Linux reports KiB, macOS bytes


def step_telemetry(device: torch.device, wait_s: float, step_s: float) -> dict[str, float]:
    """Peak memory of the step and the share of the step's wall time spent waiting for the loader."""
    total = wait_s + step_s
    return {"peak_memory_gib": peak_memory_bytes(device) / GIB,
            "data_wait_fraction": wait_s / total if total > 0 else 0.0}


def read_metrics(path: Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def step_seconds(run: Path) -> float | None:
    """Median wall time per optimizer step of a training run (from its metrics.jsonl)."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        return None
    rates = sorted(r["step_tokens"] / r["tokens_per_s"] for r in read_metrics(path)
                   if r.get("tokens_per_s") and r.get("step_tokens"))
    if not rates:
        return None
    return rates[len(rates) // 2]


def mean_tokens_per_s(run: Path) -> float | None:
    """Mean training throughput over the logged steps (tokens / s)."""
    path = run / "metrics.jsonl"
    rows = read_metrics(path) if path.is_file() else []
    return sum(r.get("tokens_per_s", 0) for r in rows) / len(rows) if rows else None


class MetricsLog:
    """Append-only JSON lines; on resume, lines past the checkpoint's step are dropped first."""

    def __init__(self, path: Path, resume_step: int | None = None, trackers: Sequence[Tracker] = ()):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        else:
            kept = [r for r in read_metrics(self.path) if r["step"] <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self.trackers = list(trackers)

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        scalars = {k: v for k, v in record.items()
                   if k not in ("step", "tokens") and isinstance(v, int | float) and not isinstance(v, bool)}
        for tracker in self.trackers:
            tracker.log(scalars, step=int(record["tokens"]))

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()


class Progress:
    """Rank 0's progress over the token budget (`mlan.progress`: a bar on a terminal, plain or JSON lines in a
    log) with the loss and learning rate; silent on other ranks."""

    def __init__(self, budget: int, done: int, enabled: bool):
        self._task = progress.Task("train", budget, "tokens", progress.LogSettings.from_env(), sys.stderr,
                                   done=done, enabled=enabled)

    def update(self, tokens: int, record: dict[str, Any]) -> None:
        self._task.update(tokens, loss=float(record["loss"]), lr=float(record["lr"]))

    def close(self) -> None:
        self._task.close()
