"""mlan.progress: plain lines at a steady cadence when stderr is a file, JSON lines that parse, --quiet; and a
redirected `mlan train` log that shows the run working (issue #23)."""
from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mlan import progress
from mlan.progress import LogSettings

sys.path.insert(0, str(Path(__file__).parent))
import shardkit

TEXT = LogSettings()
LINE = re.compile(r"^(?P<name>[\w ]+): (?P<done>[\d,]+)/(?P<total>[\d,]+) (?P<unit>\w+) \((?P<pct>\d+)%\), "
                  r"(?P<rate>[\d,.]+) (?P=unit)/s, elapsed \d+:\d\d:\d\d, ETA \d+:\d\d:\d\d(?P<metrics>.*)$")


def test_a_line_each_tenth_of_the_work_and_at_the_end():
    out = io.StringIO()
    with progress.task("work", total=1000, unit="items", settings=TEXT, stream=out, tty=False) as bar:
        for _ in range(100):
            bar.advance(10, loss=1.5)
    lines = out.getvalue().splitlines()
    assert len(lines) == 10  # 10 %, 20 %, …, 100 %; the end repeats nothing new
    done = [int(LINE.match(line)["done"].replace(",", "")) for line in lines]
    assert done == list(range(100, 1001, 100))
    assert all(line.endswith("loss 1.5") for line in lines)


def test_a_line_at_least_every_interval_while_nothing_advances():
    out = io.StringIO()
    with progress.task("slow", total=10, settings=TEXT, stream=out, interval_s=0.2, tty=False) as bar:
        bar.advance(0)
        time.sleep(0.75)  # a slow step: the heartbeat shows the run alive
    assert len(out.getvalue().splitlines()) >= 3


def test_json_lines_parse_and_carry_the_figures():
    out = io.StringIO()
    settings = LogSettings(format="json")
    with progress.task("train", total=400, unit="tokens", settings=settings, stream=out) as bar:
        for i in range(4):
            bar.advance(100, loss=2.0 - i / 10, lr=1e-3)
    progress.say("[ratio-0.25] train", settings=settings, stream=out)
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    steps = [r for r in records if r["event"] == "progress"]
    assert [r["done"] for r in steps] == [100, 200, 300, 400, 400] and steps[-1]["final"] is True
    assert {"total", "unit", "rate", "elapsed_s", "eta_s", "loss", "lr"} <= steps[0].keys()
    assert steps[-1]["eta_s"] == 0 and steps[-1]["loss"] == pytest.approx(1.7)
    assert records[-1] == {"event": "message", "text": "[ratio-0.25] train"}


def test_quiet_and_disabled_print_nothing():
    out = io.StringIO()
    with progress.task("x", total=2, settings=LogSettings(quiet=True), stream=out, tty=False) as bar:
        bar.advance(2)
    with progress.task("y", total=2, settings=TEXT, stream=out, enabled=False, tty=False) as bar:
        bar.advance(2)
    progress.say("hello", settings=LogSettings(quiet=True), stream=out)
    assert out.getvalue() == ""


def test_open_ended_work_has_no_eta_and_resume_counts_only_new_work():
    out = io.StringIO()
    with progress.task("read", total=None, unit="docs", settings=TEXT, stream=out, tty=False) as bar:
        bar.advance(7)
    assert out.getvalue().startswith("read: 7 docs, ") and "ETA ?" in out.getvalue()
    bar = progress.Task("train", 100, "tokens", TEXT, io.StringIO(), done=90, tty=False)
    time.sleep(0.05)
    bar.update(95)
    assert bar.rate() < 5 / 0.05 * 1.01 and bar.eta() == pytest.approx(5 / bar.rate(), rel=0.05)
    bar.close()


def test_settings_travel_through_the_environment():
    env: dict[str, str] = {}
    LogSettings(format="json", quiet=True).export(env)
    assert LogSettings.from_env(env) == LogSettings(format="json", quiet=True, verbose=False)
    assert LogSettings.from_env({}) == LogSettings()


# ---------------------------------------------------------------- a real run, its stderr a file
RECIPE = """
model: {family: llava, config: tiny}
train: {lr: 3.0e-3, warmup_ratio: 0.1, batch_rows: 1, grad_accum: 1, loader_workers: 0}
"""


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("progress")
    rows = shardkit.random_rows(16, seed=3, family_config=shardkit.LLAVA_FC)
    shardkit.write_build(root / "build", rows, shardkit.LLAVA_FC, seq_len=64, rows_per_shard=8)
    (root / "recipe.yaml").write_text(RECIPE)
    return root


def _train_log(root: Path, name: str, *global_options: str) -> str:
    """The run's stderr (a file, as on a cluster); stdout (the final result) goes to another."""
    log, result = root / f"{name}.log", root / f"{name}.out"
    cmd = [sys.executable, "-m", "mlan.cli", *global_options, "train", str(root / "recipe.yaml"), "--shards",
           str(root / "build"), "--out", str(root / name), "--set", "train.budget_tokens=300"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    with log.open("w") as err, result.open("w") as out:
        proc = subprocess.run(cmd, check=False, stdout=out, stderr=err, env=env, timeout=240)
    text = log.read_text()
    assert proc.returncode == 0, text
    assert "exported" in result.read_text()
    return text


# another library's progress bar in a log: tqdm's "…|██| 64/64 [00:00<00:00, …it/s]", its name ("Loading weights")
OTHER_BARS = re.compile(r"it/s\]|s/it\]|\d+%\|[█▏▎▍▌▋▊▉ ]*\||Loading weights|Writing model shards")


@pytest.fixture(scope="module")
def train_logs(tiny_build) -> dict[str, str]:
    """The same short run logged as text and as JSON lines: {format: its stderr}. The two runs go at once: each
    is mostly single-threaded interpreter and worker start-up, which the second core overlaps."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=2) as pool:
        text = pool.submit(_train_log, tiny_build, "text")
        json_lines = pool.submit(_train_log, tiny_build, "json", "--log-format", "json")
        return {"text": text.result(), "json": json_lines.result()}


@pytest.fixture(scope="module")
def text_run(train_logs) -> str:
    return train_logs["text"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_redirected_train_log_shows_progress_lines(text_run):
    text = text_run
    lines = [m for m in map(LINE.match, text.splitlines()) if m and m["name"] == "train"]
    assert len(lines) >= 3, text
    assert all(m["unit"] == "tokens" and m["total"] == "300" for m in lines)
    assert all(re.search(r"loss [\d.]+, lr [\d.e-]+$", m["metrics"]) for m in lines), text
    assert lines[-1]["done"] == "300"
    assert not OTHER_BARS.search(text), text  # no other library's bar


def _eval_log(model: Path, *global_options: str) -> str:
    task = Path(os.environ["MLAN_SHARED_DATA"]) / "eval" / "boolq_test.json"
    cmd = [sys.executable, "-m", "mlan.cli", *global_options, "eval", str(model), "--tasks", str(task), "--limit", "2"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    for key in ("HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY"):  # as a user's shell has them: unset
        env.pop(key, None)
    proc = subprocess.run(cmd, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr
    return proc.stderr


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_no_other_librarys_progress_bar_in_an_eval_log_unless_verbose(text_run, tiny_build, shared_data):
    from concurrent.futures import ThreadPoolExecutor

    model = tiny_build / "text" / "final"
    with ThreadPoolExecutor(max_workers=2) as pool:  # two processes at once: mostly start-up, one core each
        quiet, verbose = pool.submit(_eval_log, model), pool.submit(_eval_log, model, "-v")
        quiet, verbose = quiet.result(), verbose.result()
    assert not OTHER_BARS.search(quiet), "another library's progress bar in the eval log"
    assert OTHER_BARS.search(verbose), "-v shows everything (and the check sees a bar)"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_train_log_in_json_parses_line_by_line(train_logs):
    text = train_logs["json"]
    records = [json.loads(line) for line in text.splitlines()]  # every line: one JSON object
    steps = [r for r in records if r.get("event") == "progress" and r["task"] == "train"]
    assert len(steps) >= 3 and steps[-1]["done"] == 300 and steps[-1]["final"] is True
    assert all({"rate", "elapsed_s", "eta_s", "loss", "lr"} <= r.keys() for r in steps)
