"""`mlan merge` and `mlan merge-sweep`: arguments in, one summary line or a table out, errors as one line."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mlan.merge.merge import MergeConfig, merge_checkpoints
from mlan.merge.sweep import SweepSpec, merge_sweep, sweep_table
from mlan.merge.tensors import MergeError


def merge_command(args: argparse.Namespace) -> int:
    """`mlan merge`: one merge, with a progress bar and a one-line summary."""
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


def _grid(text: str, what: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise MergeError(f"--{what} must be comma-separated numbers, got {text!r}") from None
    if not values:
        raise MergeError(f"--{what} is empty")
    return sorted(set(values))



def merge_sweep_command(args: argparse.Namespace) -> int:
    """`mlan merge-sweep`: one merge per (α, K), each evaluated with `mlan eval`; a table and a plot."""
    try:
        spec = SweepSpec(
            vlm=args.vlm, llm=args.llm, alphas=tuple(_grid(args.alphas, "alphas")),
            densities=tuple(_grid(args.densities, "densities")), tasks=tuple(args.tasks), out=Path(args.out),
            scope=args.scope, direction=args.direction, limit=args.limit,
            batch_size=getattr(args, "batch_size", 8), max_new_tokens=getattr(args, "max_new_tokens", 64),
            images=getattr(args, "images", None), keep_models=getattr(args, "keep_models", False))
        rows = merge_sweep(spec)
    except MergeError as err:
        print(f"mlan merge-sweep: error: {err}", file=sys.stderr)
        return 2
    print(sweep_table(rows), end="")
    print(f"table: {spec.out / 'sweep.md'}  plot: {spec.out / 'sweep.png'}  data: {spec.out / 'sweep.json'}")
    return 0
