"""`mlan demo [--out demo-out] [--ratios R,…] [--nproc N]`: the embedded default, a complete small ablation on
this machine, and whether the scores move the way the mixture says they should."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from mlan.commands.options import add_set, example


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the embedded default: a complete small ablation on this machine",
                       description="A complete small ablation on generated data: build, train and evaluate each "
                                   "text ratio; the table, the trends and the plot.",
                       epilog=example("mlan demo --out demo-out"))
    p.add_argument("--out", default="demo-out", help="output folder (rerun to continue)")
    p.add_argument("--ratios", default=None, help="comma-separated text ratios (default: 0,0.5,1.0)")
    p.add_argument("--nproc", type=int, default=2, help="training processes per ratio (torchrun)")
    add_set(p)
    p.set_defaults(handler=demo_command)


def demo_command(args: argparse.Namespace) -> int:
    """Print the ablation table, the two trends and where the plot and table are."""
    # lazy (start-up): the ablation pulls torch, 2.4 s; `mlan --help` is 0.1 s without
    from mlan.ablate import parse_ratios
    from mlan.demo import DEMO_RATIOS, run_demo, trend

    t0 = time.perf_counter()
    out = Path(args.out)
    ratios = parse_ratios(args.ratios) if args.ratios else DEMO_RATIOS
    rows = run_demo(out, ratios, nproc=args.nproc, overrides=args.overrides)
    ablation = out / "ablation"
    lang_up, vis_up = trend(rows)
    print()
    print((ablation / "ablation.md").read_text(), end="")
    print(f"\nlanguage score rises with the text share: {'yes' if lang_up else 'NO'}; "
          f"vision score rises with the image-text share: {'yes' if vis_up else 'NO'} (chance = 25%)")
    print(f"plot: {ablation / 'ablation.png'}")
    print(f"table: {ablation / 'ablation.csv'}  (wall time {time.perf_counter() - t0:.0f}s)", file=sys.stdout)
    return 0
