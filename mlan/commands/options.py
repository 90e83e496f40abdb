"""Arguments several commands share, the help layout (every default shown, an example last) and the global
output options (`--quiet`, `--log-format`, `-v`)."""
from __future__ import annotations

import argparse

SET_EXAMPLE = "mixture.budget.tokens=200000"


class HelpFormatter(argparse.HelpFormatter):
    """Wraps the description, keeps the example's lines as written, and adds `(default: …)` to every option
    whose help does not say it."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith("example:"):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (action.default is argparse.SUPPRESS or action.required or not action.option_strings
                or "default" in text.lower() or isinstance(action, argparse._HelpAction | argparse._VersionAction)):
            return text
        default = action.default
        shown = "off" if default is False else "none" if default is None else "%(default)s"
        return f"{text} (default: {shown})"


def add_set(p: argparse.ArgumentParser, example: str = SET_EXAMPLE) -> None:
    """`--set KEY=VALUE` (repeatable): recipe overrides, collected in `args.overrides`."""
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a recipe key, e.g. --set {example} (repeatable; default: none)")


def example(*lines: str) -> str:
    """The epilog every command's help ends with: commands a person can paste (from the repository root)."""
    return "example:\n" + "\n".join(f"  {line}" for line in lines)


def add_output_options(p: argparse.ArgumentParser, top_level: bool) -> None:
    """`--quiet`, `--log-format`, `-v`: on `mlan` itself and (so they may follow the command) on every command;
    a command's copy leaves the value alone unless given (SUPPRESS)."""
    default = (lambda value: value) if top_level else (lambda value: argparse.SUPPRESS)
    p.add_argument("-q", "--quiet", action="store_true", default=default(False),
                   help="print nothing but errors and the final result (default: off)")
    p.add_argument("--log-format", choices=["text", "json"], default=default("text"),
                   help="progress and messages as plain text (a bar on a terminal) or one JSON object per line "
                        "(default: text)")
    p.add_argument("-v", "--verbose", action="store_true", default=default(False),
                   help="show other libraries' progress bars, banners and warnings too (default: off)")


def positive_int(text: str) -> int:
    """argparse type: an integer ≥ 1 (`--workers 0`, `--batch-size -1` are usage errors, exit 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer (at least 1)")
    return value
