"""Issue #22 items 4 and 5: bounded resources, and one line with exit status 2 for each user error.

Before: a YAML alias bomb ran for minutes and took gigabytes; a 1e13-token budget tried to allocate
hundreds of GiB; the other cases below ended in a traceback. `mlan.cli.main` runs in-process.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.timeout(300)]

BOMB = """\
a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
sources: [*h, *h, *h, *h, *h, *h, *h, *h, *h]
"""


def _write_recipe(tmp: Path) -> Path:
    data = tmp / "s.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Say {i}.", "input": "", "output": f"{i}"}) + "\n"
                            for i in range(20)))
    recipe = tmp / "r.yaml"
    recipe.write_text(f"sources:\n  - {{name: s, path: {data}, format: alpaca, modality: text}}\n"
                      "mixture: {budget: {examples: 10}, ratio: {text: 1.0}, seq_len: 256}\n")
    return recipe


def _run(argv: list[str], capsys) -> tuple[int, str]:
    from mlan.cli import main

    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse's own errors: usage, then one error line, status 2
        rc = exc.code
    return rc, capsys.readouterr().err


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ": error: " in line]


def test_alias_bomb_is_refused_in_one_line_at_once(tmp_path, capsys):
    from mlan.recipe import RecipeError, load_recipe

    (tmp_path / "bomb.yaml").write_text(BOMB)
    t = time.perf_counter()
    with pytest.raises(RecipeError, match="aliases expand to 490,329,064 nodes"):
        load_recipe(tmp_path / "bomb.yaml")
    assert time.perf_counter() - t < 1  # before: minutes and gigabytes
    rc, err = _run(["build", str(tmp_path / "bomb.yaml"), "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and len(_error_lines(err)) == 1 and "Traceback" not in err, err
    assert "alias" in err and "bomb.yaml" in err
    assert not (tmp_path / "o").exists()


def test_a_few_aliases_are_still_fine(tmp_path):
    from mlan.recipe import load_recipe

    recipe = _write_recipe(tmp_path)
    text = recipe.read_text().replace("path: ", "path: &data ", 1)
    text = text.replace("modality: text}\n", "modality: text}\n  - {name: t, path: *data, format: alpaca, "
                        "modality: text}\n", 1)
    (tmp_path / "a.yaml").write_text(text)
    loaded = load_recipe(tmp_path / "a.yaml")
    assert [s.name for s in loaded.sources] == ["s", "t"] and loaded.sources[0].path == loaded.sources[1].path


def _unwritable(tmp: Path) -> Path | None:
    """A folder this process cannot create files in: a chmod'ed one; as root (which ignores the mode),
    sysfs, where even root cannot create a folder."""
    if os.geteuid() != 0:
        ro = tmp / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        return ro / "out"
    try:
        Path("/sys/mlan-probe").mkdir()
    except OSError:
        return Path("/sys/mlan-out")
    Path("/sys/mlan-probe").rmdir()
    return None


CASES = {
    "weight-inf": (["--set", "sources.s.weight=inf"], "sources.0.weight"),
    "weight-nan": (["--set", "sources.s.weight=.nan"], "sources.0.weight"),
    "seed-negative": (["--set", "mixture.seed=-5"], "mixture.seed"),
    "pack-buffer-1": (["--set", "mixture.pack_buffer_tokens=1"], "mixture.pack_buffer_tokens"),
    "workers-negative": (["--workers", "-1"], "--workers"),
    "workers-zero": (["--workers", "0"], "--workers"),
    "set-bad-yaml": (["--set", "mixture.seed=*nope"], "--set mixture.seed=*nope"),
    "huge-budget": (["--set", "mixture.budget={tokens: 10000000000000}"], "mixture.max_upsample"),
}


@pytest.mark.parametrize("case", [c if c != "huge-budget" else pytest.param(c, marks=pytest.mark.slow)
                                  for c in sorted(CASES)] + ["out-is-a-file", "binary-recipe", "read-only-out",
                                                    "eval-batch-size-0", "nul-in-source-path",
                                                    pytest.param("full-disk-out", marks=pytest.mark.slow)])
def test_user_errors_are_one_line_exit_2(case, tmp_path, capsys, request):
    recipe = _write_recipe(tmp_path)
    out = tmp_path / "out"
    extra: list[str] = []
    argv: list[str] | None = None
    needle = ""
    if case in CASES:
        extra, needle = CASES[case]
    elif case == "out-is-a-file":
        out.write_text("not a folder")
        needle = "not a folder"
    elif case == "binary-recipe":
        recipe.write_bytes(bytes(range(256)) * 4)
        needle = "not a text file"
    elif case == "read-only-out":
        ro = _unwritable(tmp_path)
        if ro is None:
            pytest.skip("running as root (chmod does not stop root) and /sys is writable")
        out = ro
        needle = str(ro.parent)
    elif case == "nul-in-source-path":  # found by hand after the fuzz: os.path raised ValueError
        recipe.write_text(recipe.read_text().replace("path: ", 'path: "\\0', 1).replace(", format", '", format', 1))
        needle = "contains a NUL character"
    elif case == "full-disk-out":  # a real full disk: a 12 KiB tmpfs (needs root's mount; skipped without)
        disk = tmp_path / "disk"
        disk.mkdir()
        if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12k", "tmpfs", str(disk)],
                                                capture_output=True, check=False).returncode != 0:
            pytest.skip("cannot mount a small tmpfs here (not root, or no mount permission)")
        request.addfinalizer(lambda: subprocess.run(["umount", str(disk)], check=False))
        (tmp_path / "s.jsonl").write_text("".join(json.dumps({"instruction": f"Say {i} " + "w " * 50, "input": "",
                                                              "output": f"{i} " * 30}) + "\n" for i in range(200)))
        recipe.write_text(recipe.read_text().replace("examples: 10", "examples: 200"))
        out = disk / "out"
        extra = ["--workers", "1"]
        needle = "No space left on device"
    elif case == "eval-batch-size-0":
        argv = ["eval", str(tmp_path), "--tasks", "x.jsonl", "--batch-size", "0"]
        needle = "--batch-size"
    argv = argv or ["build", str(recipe), "--out", str(out), "--cache", str(tmp_path / "cache"), *extra]
    t = time.perf_counter()
    rc, err = _run(argv, capsys)
    assert rc == 2, err
    lines = _error_lines(err)
    assert len(lines) == 1 and "Traceback" not in err, err
    assert needle in lines[0], lines[0]
    assert time.perf_counter() - t < 120


def test_budget_far_beyond_the_sources_names_the_upsampling(tmp_path):
    """The plan is refused before its arrays are allocated, naming what the sources hold."""
    import numpy as np

    from mlan.mixture.plan import PlanError, SourceDocs, make_plan

    docs = SourceDocs(name="s", modality="text", weight=1.0, upsample=True, n_tokens=np.full(20, 50, np.int64))
    t = time.perf_counter()
    with pytest.raises(PlanError) as err:
        make_plan([docs], budget_tokens=10**13, ratio_text=1.0)
    assert time.perf_counter() - t < 1
    msg = str(err.value)
    assert "1,000 tokens" in msg and "10,000,000,000×" in msg and "mixture.max_upsample" in msg
    plan = make_plan([docs], budget_tokens=50_000, ratio_text=1.0)  # 50× is allowed by default
    assert plan.tokens == 50_000


def test_continual_recipes_refuse_alias_bombs_too(tmp_path):
    from mlan.continual.spec import load_continual
    from mlan.errors import MlanError

    (tmp_path / "bomb.yaml").write_text(BOMB)
    t = time.perf_counter()
    with pytest.raises(MlanError, match="aliases expand to"):
        load_continual(tmp_path / "bomb.yaml")
    assert time.perf_counter() - t < 1
