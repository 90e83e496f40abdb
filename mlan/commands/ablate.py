"""`mlan ablate RECIPE --ratios 0,0.25,0.5,0.75,1.0 --out DIR [--nproc 2] [--set K=V]`: build, train and
evaluate each text ratio; the table and the plot."""
from __future__ import annotations

import argparse
from pathlib import Path

from mlan.commands.options import add_set, example


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ablate", help="sweep mixture ratios: build, train and evaluate each",
                       description="Build, train and evaluate each text ratio over one tokenized cache; "
                                   "ablation.csv, ablation.md and ablation.png in --out (resumable per ratio).",
                       epilog=example("mlan ablate demo-out/demo.yaml --ratios 0,1 --out out/ablate-demo "
                                      "--nproc 1 --set mixture.budget.tokens=20000"))
    p.add_argument("recipe", help="an mlan recipe with eval.tasks (docs/ablate.md)")
    p.add_argument("--ratios", required=True, help="comma-separated text ratios, e.g. 0,0.25,0.5,0.75,1.0")
    p.add_argument("--out", required=True, help="output folder (one subfolder per ratio; rerun to continue)")
    p.add_argument("--nproc", type=int, default=2, help="training processes per ratio (torchrun)")
    p.add_argument("--workers", type=int, default=None, help="Ray tokenizer actors per build (default: all cores)")
    add_set(p)
    p.set_defaults(handler=ablate_command)


def ablate_command(args: argparse.Namespace) -> int:
    """Print ablation.md and where the table and plot are."""
    from mlan.ablate import parse_ratios, run_ablation  # lazy (start-up): pulls torch, 2.4 s; --help 0.1 s

    ratios = parse_ratios(args.ratios)
    out = Path(args.out)
    run_ablation(args.recipe, ratios, out, nproc=args.nproc, workers=args.workers, overrides=args.overrides)
    print((out / "ablation.md").read_text(), end="")
    print(f"table: {out / 'ablation.csv'}  plot: {out / 'ablation.png'}")
    return 0
