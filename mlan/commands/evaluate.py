"""`mlan eval MODEL --tasks … [--out FILE] [--reference FILE]`: scores on language and vision tasks, a table,
and the results JSON."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from mlan.commands.options import positive_int


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a model on language and vision tasks",
                       description="Score a model on language and vision tasks; print a table, write the "
                                   "results JSON with --out.",
                       epilog="example:\n  mlan eval runs/tiny-llava/final --tasks "
                              "../shared/data/eval/boolq_test.json --limit 50")
    p.add_argument("model", help="model directory (save_pretrained) or hub id")
    p.add_argument("--tasks", nargs="+", required=True, help="task files, or NAME=PATH pairs")
    p.add_argument("--out", default=None, help="results JSON file (default: none, the table only)")
    p.add_argument("--reference", default=None,
                   help="results JSON of a reference model (forgetting Δ; default: none)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="items per forward pass")
    p.add_argument("--limit", type=int, default=None, help="items per task (default: all)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="generation length for generative tasks")
    p.add_argument("--images", default=None, help="image root for image tasks (default: the task file's folder)")
    p.add_argument("--image-pattern", default=None, help="image path pattern over record fields and {split}, "
                   "e.g. 'images/{directory}/test1-{identifier}-0.png' (default: the record's image field)")
    p.set_defaults(handler=eval_command)


def eval_command(args: argparse.Namespace) -> int:
    """Print the table; write the results JSON when --out is given."""
    from mlan.eval.harness import evaluate, format_table  # lazy (start-up): pulls torch, 2.3 s; --help 0.1 s

    results = evaluate(args.model, args.tasks, batch_size=args.batch_size, limit=args.limit,
                       max_new_tokens=args.max_new_tokens, images=args.images, reference=args.reference,
                       image_pattern=args.image_pattern)
    print(format_table(results))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"results: {out}")
    return 0
