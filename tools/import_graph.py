"""mlan's import graph between files: module-level and function-level imports, cycles, and imports that climb.

design.md: cli → commands → {ablate, continual, study, train, mixture, eval, merge} → {render, families, sources}
→ {recipe, errors}. Each module gets a layer (`LAYERS`, by its first name under `mlan.`); an import from a module
to one of a higher layer climbs. `if TYPE_CHECKING:` imports count as module-level (a cycle through a type is
still a cycle of the design) and are marked as types only.

    python tools/import_graph.py            # cycles, climbing imports, function-level imports
    python tools/import_graph.py --edges    # every edge too
"""
from __future__ import annotations

import argparse
import ast
import sys
from dataclasses import dataclass
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "mlan"

# the layer of each name under mlan/ (higher imports lower, never the other way; the longest matching name counts):
# design.md's layout, plus the modules it does not name. weights (safetensors checks) and pretrained (the offline
# bases) load model files for families, tokenizer and eval, beside them; data.labels is the label constant
# "any layer may import".
LAYERS: dict[str, int] = {
    "cli": 6,
    "commands": 5,
    "ablate": 4, "continual": 4, "study": 4, "demo": 4, "pipeline": 4,
    "train": 3, "mixture": 3, "eval": 3, "merge": 3, "data": 3,
    "render": 2, "families": 2, "sources": 2, "templates": 2, "tokenizer": 2, "piece_encoding": 2, "synthetic": 2,
    "weights": 2, "pretrained": 2,
    "recipe": 2,  # validates `model.family` against the family registry (design.md): beside families, not below
    "errors": 0, "atomic_write": 0, "progress": 0, "run_lock": 0, "child_process": 0, "data.labels": 0, "": 0,
}


@dataclass(frozen=True)
class Edge:
    """One import statement of `source` that loads `target` (both dotted module names)."""

    source: str
    target: str
    line: int
    module_level: bool
    type_only: bool = False

    def __str__(self) -> str:
        where = " (in a function)" if not self.module_level else " (types only)" if self.type_only else ""
        return f"{self.source}:{self.line} -> {self.target}{where}"


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the package: dotted name → file."""
    return {module_name(p, root): p for p in sorted((root / PACKAGE).rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The longest known module that `name` is or lies in (`mlan.a.b.func` → `mlan.a.b`)."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def _targets(node: ast.Import | ast.ImportFrom, current: str, is_package: bool, known: dict[str, Path]) -> list[str]:
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:  # relative import
            anchor = current.split(".") if is_package else current.split(".")[:-1]
            anchor = anchor[: len(anchor) - (node.level - 1)]
            base = ".".join(anchor + ([base] if base else []))
        # `from mlan.x import y`: y may be a submodule (then that is the target) or a name in mlan.x
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
    found = {_resolve(n, known) for n in names if n == PACKAGE or n.startswith(PACKAGE + ".")}
    return sorted(t for t in found if t is not None and t != current)


def _file_edges(node: ast.AST, name: str, is_package: bool, known: dict[str, Path], module_level: bool,
                type_only: bool) -> list[Edge]:
    """The imports under `node` of module `name`: inside a def they are function-level."""
    out: list[Edge] = []
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            out.extend(Edge(name, t, child.lineno, module_level, type_only)
                       for t in _targets(child, name, is_package, known))
        inner = module_level and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        if isinstance(child, ast.If) and _is_type_checking(child):
            for sub, types in [(s, True) for s in child.body] + [(s, type_only) for s in child.orelse]:
                out.extend(_file_edges(ast.Module(body=[sub], type_ignores=[]), name, is_package, known, inner, types))
            continue
        out.extend(_file_edges(child, name, is_package, known, inner, type_only))
    return out


def edges(root: Path = ROOT) -> list[Edge]:
    """Every import between mlan's modules (those under `if TYPE_CHECKING:` marked `type_only`)."""
    known = modules(root)
    out: list[Edge] = []
    for name, path in known.items():
        tree = ast.parse(path.read_text(), str(path))
        out.extend(_file_edges(tree, name, path.name == "__init__.py", known, True, False))
    return out


def layer(module: str) -> int:
    """The layer of a module: its longest dotted name under mlan in LAYERS (KeyError for one not placed)."""
    name = module.partition(".")[2]
    while name not in LAYERS:
        if not name:
            raise KeyError(f"{module}: no layer in tools/import_graph.py LAYERS")
        name = name.rpartition(".")[0]
    return LAYERS[name]


def _graph(found: list[Edge], module_level_only: bool) -> nx.DiGraph:
    g = nx.DiGraph()
    g.add_edges_from((e.source, e.target) for e in found if e.module_level or not module_level_only)
    return g


def cycles(found: list[Edge], module_level_only: bool = True) -> list[list[str]]:
    """The strongly connected groups of modules (more than one module each): every cycle lies in one."""
    groups = nx.strongly_connected_components(_graph(found, module_level_only))
    return sorted(sorted(c) for c in groups if len(c) > 1)


def climbing(found: list[Edge]) -> list[Edge]:
    """Imports from a module to one of a higher layer (function-level ones included)."""
    return [e for e in found if layer(e.target) > layer(e.source)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--edges", action="store_true", help="print every edge")
    args = p.parse_args()
    found = edges()
    if args.edges:
        for e in found:
            print(f"{e}")
    for title, module_level_only in (("module-level cycles", True), ("cycles with function-level imports", False)):
        groups = cycles(found, module_level_only)
        print(f"{title}: {len(groups)}")
        for group in groups:
            print("  " + " ↔ ".join(group))
    up = climbing(found)
    print(f"imports that climb a layer: {len(up)}")
    for e in up:
        print(f"  {e}")
    return 1 if cycles(found) or up else 0


if __name__ == "__main__":
    sys.exit(main())
