"""The layering contract: the command layer (mlan/cli.py, mlan/commands/) sits on top; nothing below it imports
it, and `mlan --help` stays free of torch, Ray and the domain modules."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

MLAN = Path(__file__).resolve().parents[2] / "mlan"
COMMAND_LAYER = ("mlan.cli", "mlan.commands")


def _imported_modules(path: Path) -> list[tuple[int, str]]:
    """Every module an `import` / `from … import` statement names (anywhere in the file), with its line."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
            out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return out


def _below_command_layer() -> list[Path]:
    layer = [MLAN / "cli.py", MLAN / "commands"]
    return [p for p in MLAN.rglob("*.py") if not any(p == q or q in p.parents for q in layer)]


def _upward_imports(paths: list[Path]) -> list[str]:
    return [f"{p}:{line} imports {name}" for p in paths
            for line, name in _imported_modules(p)
            if any(name == top or name.startswith(top + ".") for top in COMMAND_LAYER)]


def test_nothing_below_the_command_layer_imports_it() -> None:
    files = _below_command_layer()
    assert len(files) > 40 and not any(p.parts[-2] == "commands" for p in files)
    assert _upward_imports(files) == []


def test_the_check_sees_an_upward_import(tmp_path) -> None:
    """The negative control: a domain module that imports the command layer (even inside a function) is caught."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from mlan.commands.train import train_command\n    import mlan.cli\n")
    assert len(_upward_imports([bad])) == 3


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["build", "--help"]])
def test_help_imports_no_torch_ray_or_domain_module(argv) -> None:
    code = ("import sys\nfrom mlan.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'ray', 'transformers', 'pydantic')"
            " or (m.startswith('mlan.') and m.split('.')[1] not in ('cli', 'commands', 'errors', 'progress')))\n"
            "print('HEAVY', heavy, file=sys.stderr)\n")
    res = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, check=True)
    assert "usage: mlan" in res.stdout and "HEAVY []" in res.stderr, res.stderr[-2000:]


@pytest.mark.parametrize("module, heavy", [("mlan.mixture.build", ("torch",)),
                                           ("mlan.train.launch", ("torch", "transformers"))])
def test_a_build_and_the_train_launcher_import_no_torch(module: str, heavy: tuple[str, ...]) -> None:
    """design.md: mixture/ does not import torch. A build's driver (and each of its Ray actors) imports
    mlan.mixture.build; torch would add ~1.2 s to each (webdataset's package imports it: used lazily). `mlan
    train`'s launcher checks the recipe, build, model files and budget, then starts torchrun: torch and
    transformers there cost ~3 s a run before the agent (which imports torch itself) even starts."""
    code = f"import sys\nimport {module}\nprint('HEAVY', sorted(m for m in {heavy!r} if m in sys.modules))\n"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "HEAVY []", res.stdout + res.stderr[-2000:]
