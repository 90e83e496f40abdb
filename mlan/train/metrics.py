"""Per-step metrics: `RUN/metrics.jsonl` (one JSON line per optimizer step), a rich progress bar, TensorBoard.

Keys: step, tokens (cumulative sequence tokens), tokens_text, tokens_image_text, loss, lr, grad_norm,
tokens_per_s, and mfu on GPU. Only rank 0 writes.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

# dense bf16 peak FLOP/s per GPU (no sparsity), by device-name substring
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}


def peak_flops(device: torch.device) -> float | None:
    """The GPU's dense bf16 peak, or None (CPU, unknown GPU): then no MFU is reported."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsLog:
    """Append-only JSON lines; on resume, lines past the checkpoint's step are dropped first."""

    def __init__(self, path: Path, resume_step: int | None = None, tensorboard_dir: Path | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        else:
            kept = [r for r in read_metrics(self.path) if r["step"] <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self._tb = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise RuntimeError("train.tensorboard: true needs the `tensorboard` package "
                                   "(pip install tensorboard)") from err
            self._tb = SummaryWriter(str(tensorboard_dir))

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if key not in ("step", "tokens") and isinstance(value, int | float):
                    self._tb.add_scalar(key, value, global_step=record["tokens"])

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


class Progress:
    """A rich bar over the token budget (tokens/s, loss, lr); silent on ranks other than 0."""

    def __init__(self, budget: int, done: int, enabled: bool):
        self._bar = None
        if not enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
        from rich.progress import Progress as RichProgress

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
