"""The `mlan` command. Thin: parses arguments, then calls one function of the module that does the work."""
from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading

from mlan.errors import MlanError, UserError, one_line  # noqa: F401  (UserError: re-exported for callers)

# command → "module:function"; modules are imported only when their command runs (fast `--help`).
COMMANDS: dict[str, str] = {
    "render": "mlan.render:render_command",
    "build": "mlan.mixture.build:build_command",
    "verify": "mlan.mixture.verify:verify_command",
    "inspect": "mlan.mixture.verify:inspect_command",
    "train": "mlan.train.launch:train_command",
    "eval": "mlan.eval.harness:eval_command",
    "ablate": "mlan.ablate:ablate_command",
    "demo": "mlan.demo:demo_command",
    "merge": "mlan.merge:merge_command",
    "merge-sweep": "mlan.merge:merge_sweep_command",
    "continual": "mlan.continual.run:continual_command",
    "study": "mlan.study:study_command",
}


def _add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, e.g. --set mixture.budget.tokens=200000 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlan", description="Language-first multimodal instruction tuning.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("render", help="render a recipe source's documents with their loss masks")
    p.add_argument("recipe")
    p.add_argument("--source", required=True, help="source name in the recipe")
    p.add_argument("--limit", type=int, default=None, help="render at most N documents")
    p.add_argument("--json", action="store_true", help="one JSON object per document")
    _add_set(p)

    p = sub.add_parser("build", help="build token-budgeted, ratio-exact, packed WebDataset shards (Ray)")
    p.add_argument("recipe")
    p.add_argument("--out", default=None, help="output directory or fsspec URL (default: ./out/<recipe name>)")
    p.add_argument("--workers", type=int, default=None, help="Ray tokenizer actors (default: all cores)")
    p.add_argument("--address", default=None, help="join an existing Ray cluster (default: start a local Ray)")
    p.add_argument("--cache", default=None, help="tokenized-cache directory (default: ~/.cache/mlan/tokenized)")
    _add_set(p)

    p = sub.add_parser("verify", help="recompute shard sha256s and counts against the manifest")
    p.add_argument("build_dir")

    p = sub.add_parser("inspect", help="print one packed row for a person")
    p.add_argument("build_dir")
    p.add_argument("--row", type=int, default=0, help="global row index (default 0)")

    p = sub.add_parser("train", help="FSDP2 training on packed shards with an exact token budget")
    p.add_argument("recipe")
    p.add_argument("--shards", required=True, help="a `mlan build` output directory")
    p.add_argument("--out", required=True, help="run directory (checkpoints, metrics.jsonl, final/)")
    p.add_argument("--nproc", type=int, default=1, help="local processes (torchrun --nproc-per-node)")
    p.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    p.add_argument("--no-verify", action="store_true",
                   help="skip checking every shard's sha256 against the manifest before step 1")
    _add_set(p)

    p = sub.add_parser("eval", help="evaluate a model on language and vision tasks")
    p.add_argument("model", help="model directory (save_pretrained) or hub id")
    p.add_argument("--tasks", nargs="+", required=True, help="task files, or NAME=PATH pairs")
    p.add_argument("--out", default=None, help="results JSON file")
    p.add_argument("--reference", default=None, help="results JSON of a reference model (forgetting Δ)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--limit", type=int, default=None, help="items per task")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--images", default=None, help="image root for image tasks")
    p.add_argument("--image-pattern", default=None, help="image path pattern over record fields and {split}, "
                   "e.g. 'images/{directory}/test1-{identifier}-0.png'")

    p = sub.add_parser("ablate", help="sweep mixture ratios: build, train and evaluate each")
    p.add_argument("recipe")
    p.add_argument("--ratios", required=True, help="comma-separated text ratios, e.g. 0,0.25,0.5,0.75,1.0")
    p.add_argument("--out", required=True)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--workers", type=int, default=None)
    _add_set(p)

    p = sub.add_parser("demo", help="the embedded default: a complete small ablation on this machine")
    p.add_argument("--out", default="demo-out")
    p.add_argument("--ratios", default=None, help="comma-separated text ratios (default 0,0.5,1.0)")
    p.add_argument("--nproc", type=int, default=2)
    _add_set(p)

    p = sub.add_parser("merge", help="training-free task-vector merge of a VLM's language tower with its base LLM")
    p.add_argument("--vlm", required=True)
    p.add_argument("--llm", required=True)
    p.add_argument("--alpha", type=float, required=True)
    p.add_argument("--density", type=float, default=1.0)
    p.add_argument("--scope", choices=["tensor", "global"], default="tensor")
    p.add_argument("--direction", choices=["toward-llm", "paper"], default="toward-llm")
    p.add_argument("--out", required=True)

    p = sub.add_parser("merge-sweep", help="merge over a grid of α and K, evaluate each, table and plot")
    p.add_argument("--vlm", required=True)
    p.add_argument("--llm", required=True)
    p.add_argument("--alphas", required=True, help="comma-separated")
    p.add_argument("--densities", required=True, help="comma-separated")
    p.add_argument("--scope", choices=["tensor", "global"], default="tensor")
    p.add_argument("--direction", choices=["toward-llm", "paper"], default="toward-llm")
    p.add_argument("--tasks", nargs="+", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--images", default=None, help="image root for image tasks")
    p.add_argument("--keep-models", action="store_true", help="keep every merged checkpoint (default: delete "
                   "each once it is evaluated; `mlan merge` rebuilds any point bit for bit)")

    p = sub.add_parser("continual", help="a task sequence (language, then VL tasks): build, train, eval each; "
                       "the forgetting matrix")
    p.add_argument("recipe", help="a continual recipe (docs/continual.md)")
    p.add_argument("--out", required=True, help="output folder (resumable: rerun to continue)")
    _add_set(p)

    p = sub.add_parser("study", help="the MLAN study on SmolLM2-135M-Instruct (offline): ratios, Soft Targets, "
                       "LoRA, merges; one report")
    p.add_argument("--out", default="study-out")
    p.add_argument("--recipe", default=None, help="study recipe (default: recipes/study-smollm2.yaml)")
    p.add_argument("--quick", action="store_true", help="a smoke run of every cell with tiny budgets")
    p.add_argument("--nproc", type=int, default=1, help="training processes per run")
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C so that every `finally` (child process groups) runs."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated()


# OS errors a user causes by naming a path that is not there or not usable; one line, exit 2 like MlanError.
_PATH_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def error_line(command: str, err: BaseException) -> str:
    """`mlan CMD: error: <message>` on one line (a message that already carries the prefix keeps one)."""
    message = one_line(err)
    prefix = f"mlan {command}: error: "
    message = message.removeprefix(prefix)
    return prefix + message


def _quiet_stdout() -> None:
    """After a closed pipe (`mlan inspect … | head`): point stdout at /dev/null so the final flush is silent."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done, 1 a command-specific failure (e.g. `verify` found bad shards), 2 a user error (one
    line on stderr), 130 Ctrl-C, 143 SIGTERM, 141 the reader of stdout went away (quietly)."""
    args = build_parser().parse_args(argv)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if in_main_thread else None
    try:
        module_name, func_name = COMMANDS[args.command].split(":")
        func = getattr(importlib.import_module(module_name), func_name)
        rc = int(func(args) or 0)
        sys.stdout.flush()
        return rc
    except (MlanError, *_PATH_ERRORS) as err:
        print(error_line(args.command, err), file=sys.stderr)
        return 2
    except BrokenPipeError:
        _quiet_stdout()
        return 128 + signal.SIGPIPE
    except Terminated:
        print(f"mlan {args.command}: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print(f"mlan {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
