"""`mlan build RECIPE [--out DIR] [--workers N] [--address RAY] [--cache DIR] [--set K=V]`: packed shards."""
from __future__ import annotations

import argparse
import errno
from pathlib import Path

from mlan.commands.options import add_set, example, positive_int
from mlan.errors import UserError

# what a full, read-only or forbidden output disk raises: the user's to fix, one line (exit 2)
_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("build", help="build token-budgeted, ratio-exact, packed WebDataset shards (Ray)",
                       description="Tokenize the recipe's sources (cached), plan the budget and ratio, pack rows "
                                   "and write WebDataset shards with manifest.json, stats.json and report.md.",
                       epilog=example("mlan build recipes/tiny-llava.yaml --out out/tiny-llava"))
    p.add_argument("recipe", help="an mlan recipe (README.md, Recipes)")
    p.add_argument("--out", default=None, help="output directory or fsspec URL (default: ./out/<recipe name>)")
    p.add_argument("--workers", type=positive_int, default=None, help="Ray tokenizer actors (default: all cores)")
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
    out = args.out or default_out(args.recipe)
    local = None if "://" in out and not out.startswith("file://") else Path(out.removeprefix("file://"))
    if local is not None and local.exists() and not local.is_dir():
        raise UserError(f"--out {out}: is a file, not a folder (name a new or existing folder)")
    try:
        build_locked(recipe, out, workers=args.workers, address=args.address, cache_dir=args.cache)
    except OSError as err:  # also a Ray task's error that is an OSError (Ray keeps the type; `cause` is it)
        cause = getattr(err, "cause", None)
        cause = cause if isinstance(cause, OSError) else err
        if cause.errno not in _DISK_ERRNOS:
            raise
        raise UserError(f"--out {out}: cannot write ({cause.strerror or cause}: {cause.filename or out})") from None
    return 0
