"""Progress a person sees: a rich bar on a terminal, plain lines in a log file, JSON lines for scripts.

A run on a cluster writes its stderr to a file, where a terminal bar shows nothing: there `task` writes one
line at a steady cadence (every `interval_s` = 30 s, every 10 % of the work, and at the end) with the work
done / total, the rate, the elapsed time, the ETA and whatever metrics the caller passes.

How output looks is a `LogSettings` (`--quiet`, `--log-format json`, `-v` of `mlan`): the CLI exports it to
the environment (`MLAN_LOG_FORMAT`, `MLAN_QUIET`, `MLAN_VERBOSE`), so torchrun workers, Ray actors and
pipeline children see the same settings as the command that started them; each call reads it from there
unless given one explicitly.

API (every long-running part of mlan uses the same three calls)::

    from mlan import progress

    with progress.task("eval boolq", total=len(items), unit="items") as bar:
        for batch in batches:
            ...
            bar.advance(len(batch), acc=0.61)        # metrics: any name=number (or short string)
    progress.say("[ratio-0.25] train …")             # one line for a person (JSON: {"event": "message"})
    progress.warn("most documents are longer …")      # a warning: one line, "warning: …"

`task(..., enabled=False)` (e.g. ranks other than 0) shows nothing. `total=None` is open-ended: no ETA.
`bar.update(done, **metrics)` sets the absolute count instead of adding to it.

Text line: `train: 1,024/4,096 tokens (25%), 812 tokens/s, elapsed 0:00:01, ETA 0:00:04, loss 6.1234, lr 1.00e-04`
JSON line: `{"event": "progress", "task": "train", "done": 1024, "total": 4096, "unit": "tokens", "rate": 812.3,
"elapsed_s": 1.26, "eta_s": 3.8, "final": false, "loss": 6.1234, "lr": 0.0001}`
"""
from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Any, Literal

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as RichProgress

LogFormat = Literal["text", "json"]
FORMAT_ENV, QUIET_ENV, VERBOSE_ENV = "MLAN_LOG_FORMAT", "MLAN_QUIET", "MLAN_VERBOSE"
INTERVAL_S = 30.0  # a plain line at least this often while work runs
STEPS = 10  # ... and each time another tenth of the total is done


@dataclass(frozen=True)
class LogSettings:
    """How mlan reports: text or JSON lines, quiet (errors and the final result only), verbose (other libraries'
    output too). Lives in the environment so that every child process inherits it."""

    format: LogFormat = "text"
    quiet: bool = False
    verbose: bool = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> LogSettings:
        env = os.environ if environ is None else environ
        fmt = env.get(FORMAT_ENV, "text")
        return cls(format="json" if fmt == "json" else "text", quiet=env.get(QUIET_ENV) == "1",
                   verbose=env.get(VERBOSE_ENV) == "1")

    def export(self, environ: MutableMapping[str, str] | None = None) -> None:
        """Write the settings where child processes read them (os.environ unless given)."""
        env = os.environ if environ is None else environ
        env[FORMAT_ENV] = self.format
        env[QUIET_ENV] = "1" if self.quiet else "0"
        env[VERBOSE_ENV] = "1" if self.verbose else "0"


def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = round(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _metric_text(name: str, value: Any) -> str:
    return f"{name} {value:.4g}" if isinstance(value, float) else f"{name} {value}"


class Task:
    """One unit of work being counted; `advance` / `update` from the loop, `close` (the context manager) at the
    end. Thread-safe: a heartbeat thread writes a line when the loop has been silent for `interval_s`."""

    def __init__(self, name: str, total: float | None, unit: str, settings: LogSettings, stream: IO[str],
                 done: float = 0, interval_s: float = INTERVAL_S, enabled: bool = True,
                 tty: bool | None = None) -> None:
        self.name, self.total, self.unit = name, total, unit
        self.settings, self.stream, self.interval_s = settings, stream, interval_s
        self.done = self._start_done = done
        self.metrics: dict[str, Any] = {}
        self._t0 = self._last_line = time.monotonic()
        self._next_fraction = self._fraction_mark(done)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._bar: RichProgress | None = None
        self._heartbeat: threading.Thread | None = None
        self._last_state: tuple = ()
        self.mode = "off" if not enabled or settings.quiet else (
            "json" if settings.format == "json" else
            "bar" if (stream.isatty() if tty is None else tty) else "text")
        if self.mode == "bar":
            self._bar = RichProgress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn(unit + "  {task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"),
                TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                console=Console(file=stream), transient=False)
            self._task = self._bar.add_task(name, total=total, completed=done, rate="", info="")
            self._bar.start()
        elif self.mode in ("text", "json"):
            self._heartbeat = threading.Thread(target=self._beat, name=f"mlan-progress-{name}", daemon=True)
            self._heartbeat.start()

    # ---------------------------------------------------------------- the caller's side
    def advance(self, n: float = 1, **metrics: Any) -> None:
        """`n` more units done; metrics (loss=…, lr=…) shown with the count."""
        self.update(self.done + n, **metrics)

    def update(self, done: float, **metrics: Any) -> None:
        """The count is now `done`."""
        with self._lock:
            self.done = done
            self.metrics.update(metrics)
            if self.mode == "bar":
                assert self._bar is not None
                rate = self.rate()
                self._bar.update(self._task, completed=done,
                                 rate=f"{rate:,.0f} {self.unit}/s" if rate is not None else "",
                                 info="  ".join(_metric_text(k, v) for k, v in self.metrics.items()))
            elif self.mode in ("text", "json"):
                now = time.monotonic()
                if now - self._last_line >= self.interval_s or self._passed_mark():
                    self._write_line(final=False)

    def close(self) -> None:
        """The final line (plain and JSON modes) or the finished bar."""
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=5)
        with self._lock:
            if self.mode == "bar" and self._bar is not None:
                self._bar.stop()
            elif self.mode == "json" or (self.mode == "text" and self._state() != self._last_state):
                self._write_line(final=True)  # (a text line that says nothing new is not repeated)
            self.mode = "off"

    # ---------------------------------------------------------------- figures
    def elapsed(self) -> float:
        return time.monotonic() - self._t0

    def rate(self) -> float | None:
        """Units per second since this task started (work done before it started, e.g. on resume, not counted)."""
        dt = self.elapsed()
        return (self.done - self._start_done) / dt if dt > 0 else None

    def eta(self) -> float | None:
        rate = self.rate()
        if self.total is None or not rate:
            return None
        return max(self.total - self.done, 0) / rate

    def record(self, final: bool) -> dict[str, Any]:
        """The JSON line's fields."""
        rate, eta = self.rate(), self.eta()
        return {"event": "progress", "task": self.name, "done": self.done, "total": self.total, "unit": self.unit,
                "rate": None if rate is None else round(rate, 3), "elapsed_s": round(self.elapsed(), 3),
                "eta_s": None if eta is None else round(eta, 3), "final": final, **self.metrics}

    def line(self) -> str:
        """The plain line: `name: done/total unit (p%), rate unit/s, elapsed h:mm:ss, ETA h:mm:ss, metrics`."""
        done = f"{self.done:,.0f}"
        if self.total is not None:
            pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
            count = f"{done}/{self.total:,.0f} {self.unit}{pct}"
        else:
            count = f"{done} {self.unit}"
        rate = self.rate()
        parts = [count, f"{rate:,.1f} {self.unit}/s" if rate is not None else f"? {self.unit}/s",
                 f"elapsed {_duration(self.elapsed())}", f"ETA {_duration(self.eta())}"]
        parts += [_metric_text(k, v) for k, v in self.metrics.items()]
        return f"{self.name}: " + ", ".join(parts)

    # ---------------------------------------------------------------- internals
    def _fraction_mark(self, done: float) -> float | None:
        if not self.total:
            return None
        k = math.floor(done * STEPS / self.total + 1e-9) + 1  # the next whole tenth (integers: no float drift)
        return self.total * k / STEPS

    def _passed_mark(self) -> bool:
        if self._next_fraction is None or self.done < self._next_fraction:
            return False
        self._next_fraction = self._fraction_mark(self.done)
        return True

    def _state(self) -> tuple:
        return self.done, tuple(self.metrics.items())

    def _write_line(self, final: bool) -> None:
        text = json.dumps(self.record(final)) if self.mode == "json" else self.line()
        self._last_state = self._state()
        try:
            self.stream.write(text + "\n")
            self.stream.flush()
        except (BrokenPipeError, ValueError):  # a closed reader or stream: progress is never worth a crash
            pass
        self._last_line = time.monotonic()

    def _beat(self) -> None:
        """A line when the loop has said nothing for `interval_s` (a slow step still shows the run is alive)."""
        while not self._stop.wait(min(self.interval_s, 1.0)):
            with self._lock:
                if self.mode in ("text", "json") and time.monotonic() - self._last_line >= self.interval_s:
                    self._write_line(final=False)


@contextmanager
def task(name: str, total: float | None = None, unit: str = "items", *, done: float = 0,
         settings: LogSettings | None = None, stream: IO[str] | None = None, interval_s: float = INTERVAL_S,
         enabled: bool = True, tty: bool | None = None) -> Iterator[Task]:
    """A progress task on stderr (or `stream`) under `settings` (default: the environment's); see the module."""
    bar = Task(name, total, unit, settings or LogSettings.from_env(), stream or sys.stderr, done=done,
               interval_s=interval_s, enabled=enabled, tty=tty)
    try:
        yield bar
    finally:
        bar.close()


def say(text: str, *, settings: LogSettings | None = None, stream: IO[str] | None = None,
        event: str = "message") -> None:
    """One line for a person on stderr (nothing under --quiet; a JSON object under --log-format json)."""
    settings = settings or LogSettings.from_env()
    if settings.quiet:
        return
    out = stream or sys.stderr
    line = json.dumps({"event": event, "text": text}) if settings.format == "json" else text
    try:
        print(line, file=out, flush=True)
    except (BrokenPipeError, ValueError):
        pass


def warn(text: str, *, settings: LogSettings | None = None, stream: IO[str] | None = None) -> None:
    """A warning a person should act on: one line `warning: …` (JSON: {"event": "warning"})."""
    settings = settings or LogSettings.from_env()
    say(text if settings.format == "json" else f"warning: {text}", settings=settings, stream=stream,
        event="warning")
