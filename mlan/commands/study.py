"""`mlan study [--out DIR] [--recipe FILE] [--quick] [--nproc N]`: the MLAN study on a real pretrained LLM,
offline; prints its report."""
from __future__ import annotations

import argparse
import os

from mlan.commands.options import example


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("study", help="the MLAN study on SmolLM2-135M-Instruct (offline): ratios, Soft Targets, "
                       "LoRA, merges; one report",
                       description="The MLAN study on SmolLM2-135M-Instruct, offline: base scores, the ratio "
                                   "sweep, Soft Targets, rsLoRA and the merge sweep; report.md (resumable).",
                       epilog=example("mlan study --quick --out out/study-quick"))
    p.add_argument("--out", default="study-out", help="output folder (rerun to continue)")
    p.add_argument("--recipe", default=None, help="study recipe (default: recipes/study-smollm2.yaml)")
    p.add_argument("--quick", action="store_true", help="a smoke run of every cell with tiny budgets")
    p.add_argument("--nproc", type=int, default=1, help="training processes per run (default: 1)")
    p.add_argument("--power-only", action="store_true",
                   help="print the power statement (per task n and the smallest detectable paired difference) "
                        "and stop before any training")
    p.set_defaults(handler=study_command)


def study_command(args: argparse.Namespace) -> int:
    """Run every unfinished cell, then print the report and its path."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from mlan.study import DEFAULT_RECIPE, power_only, run_study  # lazy (start-up): pulls torch, 3.2 s

    if args.power_only:
        print(power_only(args.out, args.recipe or DEFAULT_RECIPE, quick=args.quick))
        return 0
    report = run_study(args.out, args.recipe or DEFAULT_RECIPE, quick=args.quick, nproc=args.nproc)
    print(report.read_text(), end="")
    print(f"report: {report}")
    return 0
