"""Dependencies point down (design.md): no import cycle between mlan's files, no import that climbs a layer."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import import_graph  # tools/ is not a package: imported from its folder


@pytest.fixture(scope="module")
def edges() -> list[import_graph.Edge]:
    return import_graph.edges()


def test_no_module_level_import_cycle(edges):
    assert import_graph.cycles(edges) == []


def test_no_import_climbs_a_layer(edges):
    assert [str(e) for e in import_graph.climbing(edges)] == []


def test_every_module_has_a_layer(edges):
    for name in import_graph.modules():
        import_graph.layer(name)  # KeyError names a module design.md's layers do not place


def test_the_graph_sees_type_only_function_level_and_relative_imports(tmp_path):
    """The reference: a hand-made package whose cycle runs through a TYPE_CHECKING import and a relative one."""
    pkg = tmp_path / "mlan"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "errors.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from mlan.cli import x\n")
    (pkg / "cli.py").write_text("from . import errors\n\ndef f():\n    import mlan.recipe\n")
    (pkg / "recipe.py").write_text("")
    found = {(e.source, e.target, e.module_level, e.type_only) for e in import_graph.edges(tmp_path)}
    assert found == {("mlan.errors", "mlan.cli", True, True), ("mlan.cli", "mlan.errors", True, False),
                     ("mlan.cli", "mlan.recipe", False, False)}
    edges = import_graph.edges(tmp_path)
    assert import_graph.cycles(edges) == [["mlan.cli", "mlan.errors"]]
    assert [(e.source, e.target) for e in import_graph.climbing(edges)] == [("mlan.errors", "mlan.cli")]


def test_no_global_statement_in_mlan():
    """No hidden process state: no `global` (limits and the attention mode are parameters)."""
    found = [f"{path.relative_to(REPO)}:{node.lineno}" for path in sorted((REPO / "mlan").rglob("*.py"))
             for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Global)]
    assert found == []
