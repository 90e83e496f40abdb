"""Per-step metrics: `RUN/metrics.jsonl` (one JSON line per optimizer step), a rich progress bar, trackers.

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
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress

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
    """A rich bar over the token budget (tokens/s, loss, lr); silent on ranks other than 0."""

    def __init__(self, budget: int, done: int, enabled: bool):
        self._bar = None
        if not enabled:
            return
        self._bar = RichProgress(
            TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("tokens"),
            TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
        )
        self._task = self._bar.add_task("train", total=budget, completed=done, info="")
        self._bar.start()

    def update(self, tokens: int, record: dict[str, Any]) -> None:
        if self._bar is None:
            return
        info = f"{record['tokens_per_s']:,.0f} tok/s  loss {record['loss']:.4f}  lr {record['lr']:.2e}"
        self._bar.update(self._task, completed=tokens, info=info)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
