"""Arguments several commands share."""
from __future__ import annotations

import argparse


def add_set(p: argparse.ArgumentParser) -> None:
    """`--set KEY=VALUE` (repeatable): recipe overrides, collected in `args.overrides`."""
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, e.g. --set mixture.budget.tokens=200000 (repeatable)")
