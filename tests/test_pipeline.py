"""mlan.pipeline, the one runner of ablate, continual and study: a complete step is skipped, an incomplete or
half-written one runs (the child resumes it), a failing child is one line naming the step, a child dies with
its parent; the completeness checks on real build and results files. Children are tiny Python scripts."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import shardkit

from mlan.child_process import proc_start
from mlan.pipeline import (
    Pipeline,
    Step,
    StepFailed,
    build_complete,
    results_complete,
    sweep_complete,
)

PY = (sys.executable, "-c")

# a "command" that resumes its output: keeps the parts already written, adds the missing ones, then marks done
RESUMING = textwrap.dedent("""
    import sys
    from pathlib import Path
    out = Path(sys.argv[1]); out.mkdir(exist_ok=True)
    with open(out / "runs", "a") as f: f.write("run\\n")
    for i in range(3):
        part = out / f"part-{i}"
        if not part.exists(): part.write_text("new")
    (out / "done").write_text("ok")
""")


def done(out: Path) -> bool:
    return (out / "done").is_file()


def _step(out: Path, script: str = RESUMING, kind: str = "build", name: str = "unit") -> Step:
    return Step(kind, name, out, done, argv=(script, str(out)), program=PY)  # type: ignore[arg-type]


def test_complete_step_is_skipped_incomplete_one_runs(tmp_path) -> None:
    finished, fresh = tmp_path / "finished", tmp_path / "fresh"
    finished.mkdir()
    (finished / "done").write_text("ok")
    lines: list[str] = []
    runs = Pipeline(total=2, log=lines.append).run([_step(finished), _step(fresh, kind="train")])
    assert [r.ran for r in runs] == [False, True]
    assert not (finished / "runs").exists()  # never started
    assert (fresh / "runs").read_text() == "run\n" and done(fresh)
    assert lines[0] == f"step 1/2 build unit: complete, skipped ({finished})"
    assert lines[1].startswith("step 2/2 train unit  $ ") and len(lines) == 2


def test_half_written_output_is_run_again_and_resumed(tmp_path) -> None:
    out = tmp_path / "half"
    out.mkdir()
    (out / "part-0").write_text("kept")  # a killed run's first part, no "done" mark
    run = Pipeline(total=1, log=lambda _: None).run([_step(out)])[0]
    assert run.ran and done(out)
    assert (out / "part-0").read_text() == "kept" and (out / "part-2").read_text() == "new"
    assert not Pipeline(total=1, log=lambda _: None).run([_step(out)])[0].ran  # now complete: skipped


def test_failing_child_is_one_line_naming_the_step(tmp_path) -> None:
    failing = _step(tmp_path / "x", script="import sys; print('boom', file=sys.stderr); sys.exit(3)", kind="train",
                    name="ratio-0.25")
    pipe = Pipeline(total=3, log=lambda _: None)
    pipe.run([_step(tmp_path / "ok")])
    with pytest.raises(StepFailed) as err:
        pipe.run([failing])
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("step 2/3 train ratio-0.25 failed with status 3 (command: ")


def test_child_that_exits_0_without_its_output_is_an_error(tmp_path) -> None:
    with pytest.raises(StepFailed, match=r"step 1/1 eval e finished but its output .* is not complete"):
        Pipeline(total=1, log=lambda _: None).run([_step(tmp_path / "e", script="pass", kind="eval", name="e")])


def test_in_process_step_returns_its_value_and_is_checked(tmp_path) -> None:
    out = tmp_path / "call"
    calls: list[int] = []

    def make() -> int:
        calls.append(1)
        out.mkdir()
        (out / "done").write_text("ok")
        return 42

    step = Step("merge", "m", out, done, call=make, note="merging")
    lines: list[str] = []
    run = Pipeline(total=1, log=lines.append).run([step])[0]
    assert run.ran and run.value == 42 and lines == ["step 1/1 merge m  merging"]
    assert not Pipeline(total=1, log=lambda _: None).run([step])[0].ran and calls == [1]
    with pytest.raises(ValueError, match="exactly one"):
        Step("eval", "bad", out, done)


def test_killing_the_parent_kills_the_child(tmp_path) -> None:
    pid_file = tmp_path / "child.pid"
    child = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    parent = textwrap.dedent(f"""
        from pathlib import Path
        from mlan.pipeline import Pipeline, Step
        Pipeline(total=1).run([Step("train", "sleeper", Path({str(tmp_path / 'never')!r}), lambda p: p.exists(),
                                    argv=({child!r},), program=({sys.executable!r}, "-c"))])
    """)
    proc = subprocess.Popen([sys.executable, "-c", parent], env={**os.environ, "PYTHONPATH": os.getcwd()},
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while not (pid_file.is_file() and pid_file.read_text()):
        assert proc.poll() is None and time.time() < deadline, "the child never started"
        time.sleep(0.05)
    pid = int(pid_file.read_text())
    assert proc_start(pid) is not None
    proc.send_signal(signal.SIGKILL)  # no finally, no handler: only the kernel's parent-death signal is left
    proc.wait()
    deadline = time.time() + 10
    while proc_start(pid) is not None and time.time() < deadline:
        time.sleep(0.05)
    assert proc_start(pid) is None, "the child outlived its killed parent"


def test_build_complete_verifies_shards(tmp_path) -> None:
    build = shardkit.write_build(tmp_path / "build", shardkit.random_rows(12, 0, shardkit.LLAVA_FC),
                                 shardkit.LLAVA_FC, rows_per_shard=6)
    assert build_complete(build)
    shard = build / "shards" / "shard-000001.tar"
    shard.write_bytes(shard.read_bytes()[:-512])  # killed while writing, or corrupted since
    assert not build_complete(build)
    (build / "manifest.json").write_text('{"shards": ')  # half a manifest
    assert not build_complete(build)
    assert not build_complete(tmp_path / "missing")


def test_results_complete_needs_the_json_and_its_items_file(tmp_path) -> None:
    from mlan.eval.results_files import save_results

    results = {"tasks": {"t": {"accuracy": 50.0, "n": 2, "group": "language", "kind": "choice",
                               "records": [{"correct": True}, {"correct": False}]}}, "language_avg": 50.0}
    target = tmp_path / "eval.json"
    assert not results_complete(target)
    save_results(results, target)
    assert results_complete(target)
    items = tmp_path / "eval.items.jsonl"
    text = items.read_text()
    items.write_text(text[: len(text) // 2])  # a torn items file
    assert not results_complete(target)
    items.unlink()
    assert not results_complete(target)  # the JSON alone (no per-item records) is not a finished eval
    target.write_text("{")
    assert not results_complete(target)

    sweep = tmp_path / "sweep" / "sweep.json"
    sweep.parent.mkdir()
    sweep.write_text(json.dumps([{"point": "points/a"}]))
    assert not sweep_complete(sweep)
    save_results(results, sweep.parent / "points" / "a" / "results.json")
    assert sweep_complete(sweep)


def test_ablate_continual_study_start_no_bare_subprocess() -> None:
    """Their children go through the runner (mlan.child_process), never a bare subprocess call."""
    root = Path(__file__).resolve().parents[1] / "mlan"
    for path in [root / "ablate.py", root / "study.py", *sorted((root / "continual").glob("*.py"))]:
        assert "subprocess" not in path.read_text(), path
