"""`mlan merge` (one training-free task-vector merge) and `mlan merge-sweep` (a grid of α and K, each merged and
evaluated; a table and a plot)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mlan.commands.options import example


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="training-free task-vector merge of a VLM's language tower with its base LLM",
                       description="Merge the language tower of a VLM with its base LLM: T = VLM − LLM, the "
                                   "top-K fraction of |T| moved by α (docs/merge.md); the output loads with "
                                   "from_pretrained.",
                       epilog=example("mlan merge --vlm out/study-quick/ratio-0.0/run/final --llm smollm2-135m-instruct "
                                      "--alpha 0.5 --density 0.2 --out out/merged"))
    _merge_pair(p)
    p.add_argument("--alpha", type=float, required=True, help="how far toward the base LLM (0: the VLM, 1: the LLM)")
    p.add_argument("--density", type=float, default=1.0, help="K: the fraction of |T| entries merged")
    _merge_mode(p)
    p.add_argument("--out", required=True, help="output folder (empty or new)")
    p.set_defaults(handler=merge_command)

    p = sub.add_parser("merge-sweep", help="merge over a grid of α and K, evaluate each, table and plot",
                       description="One merge per (α, K), each evaluated as `mlan eval` does; a table and a plot "
                                   "in --out.",
                       epilog=example("mlan merge-sweep --vlm out/study-quick/ratio-0.0/run/final "
                                      "--llm smollm2-135m-instruct --alphas 0,0.5 --densities 0.2 "
                                      "--tasks ../shared/data/eval/boolq_test.json --limit 10 --out out/merge-sweep"))
    _merge_pair(p)
    p.add_argument("--alphas", required=True, help="comma-separated α values, e.g. 0,0.25,0.5")
    p.add_argument("--densities", required=True, help="comma-separated K values, e.g. 0.1,0.5,1")
    _merge_mode(p)
    p.add_argument("--tasks", nargs="+", required=True, help="task files, or NAME=PATH pairs (as `mlan eval`)")
    p.add_argument("--out", required=True, help="output folder (table, plot, one folder per point)")
    p.add_argument("--limit", type=int, default=None, help="items per task (default: all)")
    p.add_argument("--batch-size", type=int, default=8, help="items per forward pass")
    p.add_argument("--max-new-tokens", type=int, default=64, help="generation length for generative tasks")
    p.add_argument("--images", default=None, help="image root for image tasks")
    p.add_argument("--keep-models", action="store_true", help="keep every merged checkpoint (default: delete "
                   "each once it is evaluated; `mlan merge` rebuilds any point bit for bit)")
    p.set_defaults(handler=merge_sweep_command)


def _merge_pair(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vlm", required=True, help="the VLM checkpoint (folder or hub id; safetensors)")
    p.add_argument("--llm", required=True, help="its base LLM checkpoint (folder, hub id or smollm2-135m-instruct; safetensors)")


def _merge_mode(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scope", choices=["tensor", "global"], default="tensor",
                   help="top-K per tensor or over the whole tower")
    p.add_argument("--direction", choices=["toward-llm", "paper"], default="toward-llm",
                   help="toward-llm: VLM + α(LLM − VLM); paper: the paper's sign (away from the LLM)")


def merge_command(args: argparse.Namespace) -> int:
    """One merge, with a progress bar and a one-line summary."""
    # lazy (start-up): the merge pulls torch, 2.5 s; `mlan --help` is 0.1 s without
    from mlan.merge import MergeConfig, MergeError, merge_checkpoints

    try:
        config = MergeConfig(alpha=args.alpha, density=args.density, scope=args.scope,
                             direction=args.direction)
        report = merge_checkpoints(args.vlm, args.llm, args.out, config, progress=True)
    except MergeError as err:
        print(f"mlan merge: error: {err}", file=sys.stderr)
        return 2
    print(f"merged {report.mapped_tensors} tensors ({report.mapped_entries:,} entries, "
          f"{report.selected_entries:,} in T̂), kept {report.kept_vlm_tensors} VLM-only tensors "
          f"→ {args.out} in {report.seconds:.1f}s")
    return 0


def merge_sweep_command(args: argparse.Namespace) -> int:
    """One merge per (α, K), each evaluated with `mlan eval`; a table and a plot."""
    # lazy (start-up): as in merge_command
    from mlan.merge import MergeError, SweepSpec, merge_sweep, sweep_table

    try:
        spec = SweepSpec(
            vlm=args.vlm, llm=args.llm, alphas=tuple(grid(args.alphas, "alphas")),
            densities=tuple(grid(args.densities, "densities")), tasks=tuple(args.tasks), out=Path(args.out),
            scope=args.scope, direction=args.direction, limit=args.limit,
            batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
            images=args.images, keep_models=args.keep_models)
        rows = merge_sweep(spec)
    except MergeError as err:
        print(f"mlan merge-sweep: error: {err}", file=sys.stderr)
        return 2
    print(sweep_table(rows), end="")
    print(f"table: {spec.out / 'sweep.md'}  plot: {spec.out / 'sweep.png'}  data: {spec.out / 'sweep.json'}")
    return 0


def grid(text: str, what: str) -> list[float]:
    """'0.5,0.1,0.5' → [0.1, 0.5]: the sorted distinct values of a comma-separated option."""
    from mlan.merge import MergeError  # lazy (start-up): as in merge_command

    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise MergeError(f"--{what} must be comma-separated numbers, got {text!r}") from None
    if not values:
        raise MergeError(f"--{what} is empty")
    return sorted(set(values))
