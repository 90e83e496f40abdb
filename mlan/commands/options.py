"""Arguments several commands share."""
from __future__ import annotations

import argparse


def add_set(p: argparse.ArgumentParser) -> None:
    """`--set KEY=VALUE` (repeatable): recipe overrides, collected in `args.overrides`."""
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, e.g. --set mixture.budget.tokens=200000 (repeatable)")


def positive_int(text: str) -> int:
    """argparse type: an integer ≥ 1 (`--workers 0`, `--batch-size -1` are usage errors, exit 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer (at least 1)")
    return value
