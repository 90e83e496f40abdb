"""`mlan build RECIPE [--out DIR] [--workers N] [--address RAY] [--cache DIR] [--set K=V]`: packed shards."""
from __future__ import annotations

import argparse
from pathlib import Path

from mlan.commands.options import add_set, example


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("build", help="build token-budgeted, ratio-exact, packed WebDataset shards (Ray)",
                       description="Tokenize the recipe's sources (cached), plan the budget and ratio, pack rows "
                                   "and write WebDataset shards with manifest.json, stats.json and report.md.",
                       epilog=example("mlan build recipes/tiny-llava.yaml --out out/tiny-llava"))
    p.add_argument("recipe", help="an mlan recipe (README.md, Recipes)")
    p.add_argument("--out", default=None, help="output directory or fsspec URL (default: ./out/<recipe name>)")
    p.add_argument("--workers", type=int, default=None, help="Ray tokenizer actors (default: all cores)")
    p.add_argument("--address", default=None, help="join an existing Ray cluster (default: start a local Ray)")
    p.add_argument("--cache", default=None, help="tokenized-cache directory (default: ~/.cache/mlan/tokenized)")
    add_set(p)
    p.set_defaults(handler=build_command)


def default_out(recipe_path: str) -> str:
    """./out/<recipe file stem>."""
    return str(Path("out") / Path(recipe_path).stem)


def build_command(args: argparse.Namespace) -> int:
    """An impossible plan is a PlanError (a RecipeError): one line, exit status 2."""
    # lazy (start-up): the build pulls Ray and torch, 3.5 s; `mlan --help` is 0.1 s without
    from mlan.mixture.build import build_locked
    from mlan.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    build_locked(recipe, args.out or default_out(args.recipe), workers=args.workers, address=args.address,
                 cache_dir=args.cache)
    return 0
