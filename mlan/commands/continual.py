"""`mlan continual RECIPE --out DIR [--set K=V]`: a task sequence, each task built, trained and evaluated; the
forgetting matrix and its report."""
from __future__ import annotations

import argparse
from pathlib import Path

from mlan.commands.options import add_set, example


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("continual", help="a task sequence (language, then VL tasks): build, train, eval each; "
                       "the forgetting matrix",
                       description="Build, train and evaluate each task of a continual recipe in order; "
                                   "matrix.csv, forgetting.json, report.md and heatmap.png in --out.",
                       epilog=example("mlan continual recipes/continual-tiny.yaml --out out/ct-naive",
                                      "mlan continual recipes/continual-tiny.yaml --out out/ct-msgm "
                                      "--set method=msgm --set rehearsal.fraction=0.01"))
    p.add_argument("recipe", help="a continual recipe (docs/continual.md)")
    p.add_argument("--out", required=True, help="output folder (resumable: rerun to continue)")
    add_set(p, "method=lora")
    p.set_defaults(handler=continual_command)


def continual_command(args: argparse.Namespace) -> int:
    """Print report.md and where the matrix, forgetting scores and heatmap are."""
    from mlan.continual.run import run_continual  # lazy (start-up): pulls torch, 2.9 s; --help 0.1 s

    out = Path(args.out)
    run_continual(args.recipe, out, args.overrides)
    print((out / "report.md").read_text(), end="")
    print(f"matrix: {out / 'matrix.csv'}  forgetting: {out / 'forgetting.json'}  heatmap: {out / 'heatmap.png'}")
    return 0
