"""`mlan compare A B [--json]`: two `mlan eval` results on the same items, paired — per task and pooled per
group, both scores with n and Wilson intervals, B − A with a paired bootstrap 95 % interval and the exact
McNemar p. A and B are results files (FILE.json beside FILE.items.jsonl) or folders holding one."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from mlan.commands.options import example
from mlan.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="paired comparison of two eval results on the same items",
                       description=__doc__,
                       epilog=example("mlan compare demo-out/ablation/ratio-0.0 demo-out/ablation/ratio-1.0"))
    p.add_argument("a", help="results file of run A (the reference, e.g. the base model), or a folder holding one")
    p.add_argument("b", help="results file of run B, or a folder holding one; differences are B − A")
    p.add_argument("--json", action="store_true", help="print the comparison as one JSON object (default: a table)")
    p.set_defaults(handler=compare_command)


def find_results(path: str) -> Path:
    """A results file, or the one results file (a .json with its .items.jsonl beside it) in a folder."""
    p = Path(path)
    if p.is_file():
        return p
    if not p.is_dir():
        raise UserError(f"{path}: no such results file or folder")
    found = sorted(f for f in p.glob("*.json") if f.with_name(f.stem + ".items.jsonl").is_file())
    if not found:
        raise UserError(f"{path}: no results file with a per-item file beside it (FILE.json + FILE.items.jsonl; "
                        "`mlan eval --out FILE.json` writes both)")
    if len(found) > 1:
        raise UserError(f"{path}: {len(found)} results files ({', '.join(f.name for f in found)}); name one")
    return found[0]


def load_run(path: str) -> tuple[Path, dict]:
    """(results file, results dict with each task's per-item records under tasks[NAME]["records"])."""
    from mlan.eval.results_files import load_results

    file = find_results(path)
    return file, load_results(file, required=True)


def _signed_interval(lo: float, hi: float) -> str:
    return f"[{lo:+.1f}, {hi:+.1f}]"


def format_comparison(cmp: dict, a_name: str, b_name: str) -> str:
    """The terminal table: per task then pooled per group."""
    from mlan.eval.stats import BOOTSTRAP_RESAMPLES, format_score

    head = (f"{'task':<24} {'group':<9} {'n':>6} {'A: acc [95 %]':>19} {'B: acc [95 %]':>19} {'B − A':>7} "
            f"{'[95 % paired]':>16} {'McNemar p':>10}")
    lines = [f"A: {a_name}", f"B: {b_name}", head]

    def row(label: str, group: str, c: dict) -> str:
        a = format_score(c["a"]["accuracy"], c["a"]["ci95"])
        b = format_score(c["b"]["accuracy"], c["b"]["ci95"])
        return (f"{label:<24} {group:<9} {c['n']:>6} {a:>19} {b:>19} {c['difference']:>+7.1f} "
                f"{_signed_interval(*c['difference_ci95']):>16} {c['mcnemar_p']:>10.4f}")

    for name, c in cmp["tasks"].items():
        lines.append(row(name, c["group"], c))
    for group, c in cmp["groups"].items():
        lines.append(row(f"pooled {group}", group, c) + f"  ({len(c['tasks'])} task(s), every item once)")
    for side, names in (("A", cmp["only_a"]), ("B", cmp["only_b"])):
        if names:
            lines.append(f"only in {side} (not compared): {', '.join(names)}")
    lines.append(f"acc in % with its Wilson 95 % interval; B − A in points with a paired bootstrap 95 % interval "
                 f"({BOOTSTRAP_RESAMPLES:,} resamples of the items, seed 0); McNemar p: exact two-sided binomial "
                 "test on the items where A and B disagree.")
    return "\n".join(lines)


def compare_command(args: argparse.Namespace) -> int:
    """Print the paired comparison of B with A (a table, or JSON with --json)."""
    from mlan.eval.stats import compare_records  # lazy (start-up): numpy

    file_a, run_a = load_run(args.a)
    file_b, run_b = load_run(args.b)
    cmp = compare_records(run_a["tasks"], run_b["tasks"])
    if not cmp["tasks"]:
        raise UserError(f"{file_a} and {file_b} share no task (A: {', '.join(run_a['tasks'])}; "
                        f"B: {', '.join(run_b['tasks'])})")
    if args.json:
        print(json.dumps({"a": str(file_a), "b": str(file_b), "difference": "B - A, percentage points", **cmp},
                         indent=2))
    else:
        print(format_comparison(cmp, f"{file_a} ({run_a.get('model', '?')})", f"{file_b} ({run_b.get('model', '?')})"))
    return 0
