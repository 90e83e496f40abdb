"""The command layer: one module per `mlan` command (or related pair), each holding its argparse arguments and
its `*_command`; `build_parser` assembles them in the order `mlan --help` lists them.

Command modules import their domain modules inside the command functions: those pull torch or Ray (2-4 s
measured each) and `mlan --help` stays at 0.04 s without them.
"""
from __future__ import annotations

import argparse

from mlan import __version__
from mlan.commands import (
    ablate,
    build,
    compare,
    continual,
    demo,
    evaluate,
    merge,
    render,
    shards,
    study,
    train,
)
from mlan.commands.options import HelpFormatter, add_output_options

# each registers its sub-commands in this order: the order `mlan --help` prints them
REGISTRARS = (render.register, build.register, shards.register, train.register, evaluate.register, compare.register,
              ablate.register, demo.register, merge.register, continual.register, study.register)


def build_parser() -> argparse.ArgumentParser:
    """`mlan`'s parser; each sub-command's namespace carries `handler`, the function that runs it. Every
    command shows its defaults and accepts the output options after its name too."""
    parser = argparse.ArgumentParser(prog="mlan", description="Language-first multimodal instruction tuning.",
                                     formatter_class=HelpFormatter,
                                     epilog="example:\n  mlan build recipes/tiny-llava.yaml --out out/tiny-llava\n"
                                            "  mlan <command> --help   (each command's options and an example)")
    parser.add_argument("--version", action="version", version=f"mlan {__version__}")
    add_output_options(parser, top_level=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in REGISTRARS:
        register(sub)
    for command in sub.choices.values():
        command.formatter_class = HelpFormatter
        add_output_options(command, top_level=False)
    return parser
