"""`mlan train RECIPE --shards DIR --out RUN [--nproc N] [--resume] [--no-verify] [--set K=V]`: torchrun with N
local workers (mlan/commands/train_worker.py), then the exported model's path."""
from __future__ import annotations

import argparse

from mlan.commands.options import add_set, example


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="FSDP2 training on packed shards with an exact token budget",
                       description="torchrun with N local workers over a build's shards; checkpoints, "
                                   "metrics.jsonl and the exported model (RUN/final).",
                       epilog=example("mlan train recipes/tiny-llava.yaml --shards out/tiny-llava "
                                      "--out runs/tiny-llava --nproc 2"))
    p.add_argument("recipe", help="the recipe the shards were built from (its train section is used)")
    p.add_argument("--shards", required=True, help="a `mlan build` output directory")
    p.add_argument("--out", required=True, help="run directory (checkpoints, metrics.jsonl, final/)")
    p.add_argument("--nproc", type=int, default=1, help="local processes (torchrun --nproc-per-node)")
    p.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    p.add_argument("--no-verify", action="store_true",
                   help="skip checking every shard's sha256 against the manifest before step 1")
    add_set(p)
    p.set_defaults(handler=train_command)


def train_command(args: argparse.Namespace) -> int:
    """Every failure is an MlanError: cli.py prints it as one line and exits 2."""
    from mlan.train.launch import run_training  # lazy (start-up): pulls torch, 2.8 s; --help 0.1 s

    final = run_training(args.recipe, args.shards, args.out, nproc=args.nproc, resume=args.resume,
                         overrides=args.overrides, verify=not args.no_verify)
    print(f"mlan train: exported {final}")
    return 0
