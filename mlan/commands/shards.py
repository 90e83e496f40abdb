"""`mlan verify BUILD` (shards against their manifest) and `mlan inspect BUILD [--row N]` (one packed row, for a
person): the two commands that read a finished build."""
from __future__ import annotations

import argparse
import sys
from typing import Any

from mlan.commands.options import example


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="recompute shard sha256s and counts against the manifest",
                       description="Recompute every shard's sha256 and counts against manifest.json and read every "
                                   "row as the loader does; exit status 1 naming each bad shard and row.",
                       epilog=example("mlan verify out/tiny-llava"))
    p.add_argument("build_dir", help="a `mlan build` output folder")
    p.set_defaults(handler=verify_command)

    p = sub.add_parser("inspect", help="print one packed row for a person",
                       description="One packed row: its documents, trained spans marked, images listed.",
                       epilog=example("mlan inspect out/tiny-llava --row 0"))
    p.add_argument("build_dir", help="a `mlan build` output folder")
    p.add_argument("--row", type=int, default=0, help="global row index (default: 0)")
    p.set_defaults(handler=inspect_command)


def verify_command(args: argparse.Namespace) -> int:
    """Exit status 1 when any shard or row is bad (each problem on its own line), else 0."""
    # lazy (start-up): verify pulls torch via the image decoder, 2.7 s; `mlan --help` is 0.1 s without
    from rich.console import Console

    from mlan.mixture.shards import read_manifest
    from mlan.mixture.verify import verify_build

    console = Console(stderr=True, highlight=False)
    problems = verify_build(args.build_dir)
    manifest = read_manifest(args.build_dir).data
    if problems:
        for p in problems:
            console.print(f"[red]BAD[/red] {p}")
        bad = sorted({p.split(":", 1)[0] for p in problems})
        bad_rows = sorted({p.split(": ", 2)[1] for p in problems if ": row " in p})
        console.print(f"mlan verify: {len(bad)} of {len(manifest['shards'])} shards bad: {', '.join(bad)}"
                      + (f"; {len(bad_rows)} bad rows" if bad_rows else ""))
        return 1
    console.print(f"mlan verify: {len(manifest['shards'])} shards, {manifest['totals']['rows']} rows, "
                  f"{manifest['totals']['tokens']:,} tokens: all match the manifest; every row read "
                  "(document lengths, image tokens per image, no loss on image tokens, images decode)")
    return 0


def inspect_command(args: argparse.Namespace) -> int:
    """A row index out of range: one line, exit status 2."""
    from mlan.mixture.verify import describe_row, find_row  # lazy (start-up): as in verify_command

    try:
        manifest, row = find_row(args.build_dir, args.row)
    except IndexError as err:
        print(f"mlan inspect: error: {err}", file=sys.stderr)
        return 2
    print(describe_row(manifest, row, _load_tokenizer(manifest)))
    return 0


def _load_tokenizer(manifest: dict) -> Any:
    """The build's tokenizer, or None (with a note) when it cannot be loaded: ids are still worth showing."""
    try:  # the import inside: a tokenizer stack that fails to import also falls back to ids
        from mlan.tokenizer import load_tokenizer  # lazy (start-up): as in verify_command

        return load_tokenizer(manifest["recipe"]["model"]["tokenizer"])
    except Exception as err:  # noqa: BLE001 - ids are still worth showing
        print(f"mlan inspect: tokenizer unavailable ({err}); showing ids", file=sys.stderr)
        return None
