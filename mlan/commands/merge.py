"""`mlan merge` (one training-free task-vector merge) and `mlan merge-sweep` (a grid of α and K, each merged and
evaluated; a table and a plot)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="training-free task-vector merge of a VLM's language tower with its base LLM")
    p.add_argument("--vlm", required=True)
    p.add_argument("--llm", required=True)
    p.add_argument("--alpha", type=float, required=True)
    p.add_argument("--density", type=float, default=1.0)
    p.add_argument("--scope", choices=["tensor", "global"], default="tensor")
    p.add_argument("--direction", choices=["toward-llm", "paper"], default="toward-llm")
    p.add_argument("--out", required=True)
    p.set_defaults(handler=merge_command)

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
    p.set_defaults(handler=merge_sweep_command)


def merge_command(args: argparse.Namespace) -> int:
    """One merge, with a progress bar and a one-line summary."""
    # lazy (start-up): the merge pulls torch, 2.5 s; `mlan --help` is 0.1 s without
    from mlan.merge import MergeConfig, MergeError, merge_checkpoints

    try:
        config = MergeConfig(alpha=args.alpha, density=args.density, scope=args.scope,
                             direction=args.direction)
        report = merge_checkpoints(args.vlm, args.llm, args.out, config, progress=sys.stderr.isatty())
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
