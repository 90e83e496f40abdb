"""The one runner of `mlan ablate`, `mlan continual` and `mlan study`: a list of steps (build | train | eval |
merge), each skipped when its output is complete and verified, run when not.

A build or train step is an `mlan` command run as a child process through `mlan.child_process.run_child` (its
own process group, killed with this process, SIGKILL included); both commands resume an interrupted output
themselves (a build keeps its finished shards, `mlan train --resume` continues from its last checkpoint). An
eval or merge step is the in-process call the commands make (`evaluate` + `save_results`, `merge_sweep`): the
recipe's eval tasks (templates, groups, sources) have no command-line form in `mlan eval`. One line per step
says which runs (`step 3/12 train ratio-0.25  $ mlan train …`) through `mlan.progress`; the child's own
progress lines follow it on the same stream. After a step the runner checks its output again, so a command
that exits 0 without finishing its output is an error, not a silent skip next time.
"""
from __future__ import annotations

import os
import shlex
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from safetensors import safe_open

from mlan import progress
from mlan.child_process import run_child
from mlan.errors import MlanError

StepKind = Literal["build", "train", "eval", "merge"]
MLAN: tuple[str, ...] = (sys.executable, "-m", "mlan.cli")  # `mlan` as the running interpreter starts it
CHILD_ENV = {"TOKENIZERS_PARALLELISM": "false", "RAY_USAGE_STATS_ENABLED": "0"}  # unless the caller set them


class StepFailed(MlanError):
    """A step's command exited non-zero, or finished without completing its output; one line naming the step."""


# ---------------------------------------------------------------- what "complete" means per kind of output
def build_complete(build: Path) -> bool:
    """A build whose manifest reads and whose every shard's sha256 matches it (`mlan train`'s pre-flight)."""
    from mlan.mixture.verify import verify_build  # lazy: the shard reader pulls webdataset

    if not (Path(build) / "manifest.json").is_file():
        return False
    try:
        return not verify_build(str(build), read=False)
    except (MlanError, OSError, ValueError, KeyError, TypeError):  # an unreadable manifest: not complete
        return False


def export_complete(final: Path) -> bool:
    """A `save_pretrained` folder with a config, a tokenizer and weight files whose headers and sizes agree."""
    final = Path(final)
    if not (final / "config.json").is_file() or not (final / "tokenizer.json").is_file():
        return False
    weights = sorted(final.glob("*.safetensors"))
    if not weights:
        return False
    for w in weights:
        try:
            with safe_open(str(w), framework="pt") as f:  # truncated files fail the header/size check
                names = list(f.keys())
        except Exception:  # noqa: BLE001 - any unreadable file means: not complete
            return False
        if not names:
            return False
    return True


def results_complete(results: Path) -> bool:
    """A results JSON of `mlan eval` and its per-item file beside it, both parsing, one record per scored item
    (save_results writes the items file first and the JSON last, so a stopped eval leaves no JSON)."""
    from mlan.eval.results_files import load_results

    if not Path(results).is_file():
        return False
    try:
        loaded = load_results(Path(results), required=True)
    except (MlanError, OSError, ValueError, KeyError, TypeError):
        return False
    return all(len(t["records"]) == t.get("n", len(t["records"])) for t in loaded["tasks"].values())


def sweep_complete(sweep: Path) -> bool:
    """A merge sweep's sweep.json (written last) listing points whose every results file is complete."""
    import json

    try:
        rows = json.loads(Path(sweep).read_text())
        return isinstance(rows, list) and all(results_complete(Path(sweep).parent / r["point"] / "results.json")
                                              for r in rows)
    except (OSError, ValueError, KeyError, TypeError):
        return False


# ---------------------------------------------------------------- steps
@dataclass(frozen=True)
class Step:
    """One step: `argv` (arguments of `program`, `mlan` by default) run as a child, or `call` run in process;
    skipped when `complete(output)` holds before it, an error when it does not hold after it."""

    kind: StepKind
    name: str  # the unit the step belongs to: ratio-0.25, task-2-colours, base
    output: Path
    complete: Callable[[Path], bool]
    argv: tuple[str, ...] = ()
    call: Callable[[], Any] | None = None
    note: str = ""  # what an in-process step does, for its announcement
    program: tuple[str, ...] = field(default=MLAN)

    def __post_init__(self) -> None:
        if bool(self.argv) == (self.call is not None):
            raise ValueError(f"step {self.kind} {self.name}: give argv (a child command) or call, exactly one")

    @property
    def label(self) -> str:
        return f"{self.kind} {self.name}"

    def command_line(self) -> str:
        """The command as a person would type it (`mlan train …`)."""
        prefix = "mlan" if self.program == MLAN else shlex.join(self.program)
        return f"{prefix} {shlex.join(self.argv)}"


@dataclass(frozen=True)
class StepRun:
    """What the runner did with a step: run it (with its wall time and, for a call, what it returned) or skip it."""

    step: Step
    ran: bool
    seconds: float
    value: Any = None


def evaluation(model: str, tasks: Sequence[Any], target: Path, *, batch_size: int, limit: int | None,
               max_new_tokens: int, reference: str | None = None) -> Callable[[], dict]:
    """The eval step's call: score `model` on `tasks` and write `target` (+ its items file) as `mlan eval` does."""

    def run() -> dict:
        from mlan.eval.harness import evaluate  # lazy: the harness pulls torch
        from mlan.eval.results_files import save_results

        results = evaluate(model, list(tasks), batch_size=batch_size, limit=limit, max_new_tokens=max_new_tokens,
                           reference=reference, keep_records=True)
        save_results(results, target)  # the items file, then the JSON (the step's "complete" mark) last
        return results

    return run


class Pipeline:
    """Runs steps in order, numbering them across every `run` call (`step 3/12`); `total` is the caller's count
    of the steps it plans (it grows if more come)."""

    def __init__(self, total: int, log: Callable[[str], None] | None = None, env: Mapping[str, str] | None = None,
                 grace_s: float = 20.0) -> None:
        self.total, self.done = total, 0
        self.log = log or progress.say
        self.env = env
        self.grace_s = grace_s

    def run(self, steps: Iterable[Step]) -> list[StepRun]:
        """Each step skipped when complete, else run (a child's failure raises StepFailed naming the step)."""
        return [self.run_step(step) for step in steps]

    def run_step(self, step: Step) -> StepRun:
        self.done += 1
        self.total = max(self.total, self.done)
        where = f"step {self.done}/{self.total} {step.label}"
        if step.complete(step.output):
            self.log(f"{where}: complete, skipped ({step.output})")
            return StepRun(step, ran=False, seconds=0.0)
        t0 = time.perf_counter()
        value = None
        if step.call is not None:
            self.log(f"{where}  {step.note}".rstrip())
            value = step.call()
        else:
            self.log(f"{where}  $ {step.command_line()}")
            env = dict(os.environ if self.env is None else self.env)
            for key, value in CHILD_ENV.items():
                env.setdefault(key, value)
            rc = run_child([*step.program, *step.argv], env=env, grace_s=self.grace_s)
            if rc != 0:
                raise StepFailed(f"{where} failed with status {rc} (command: {step.command_line()})")
        if not step.complete(step.output):
            raise StepFailed(f"{where} finished but its output {step.output} is not complete")
        return StepRun(step, ran=True, seconds=time.perf_counter() - t0, value=value)
