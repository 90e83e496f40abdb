"""`mlan eval MODEL --tasks … [--protocol P] [--out FILE] [--reference FILE]`: scores on language and vision
tasks, a table with n and 95 % intervals, the results JSON and its per-item file (docs/eval.md)."""
from __future__ import annotations

import argparse
from pathlib import Path

from mlan.commands.options import example, positive_int

PROTOCOL_HELP = ("how language multiple-choice files are scored: lm-eval (lm-evaluation-harness zero-shot "
                 "log-likelihood, acc and acc_norm; default), mlan-paper (generative, chat template, exact match), "
                 "labels (LLM-Adapters answerK labels)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a model on language and vision tasks",
                       description="Score a model on language and vision tasks; print a table, write the "
                                   "results JSON with --out.",
                       epilog=example("mlan eval runs/tiny-llava/final --tasks ../shared/data/eval/boolq_test.json "
                                      "--limit 50 --out runs/tiny-llava/eval.json"))
    p.add_argument("model", help="model directory (save_pretrained) or hub id")
    p.add_argument("--tasks", nargs="+", required=True, help="task files, NAME=PATH pairs, or lm-eval:NAME (an lm-evaluation-harness task or task YAML, run "
                   "by the harness itself; needs the lm-eval extra)")
    p.add_argument("--out", default=None, help="results JSON file; the per-item file FILE.items.jsonl is written "
                   "beside it (default: none, the table only)")
    p.add_argument("--protocol", default="lm-eval", choices=["lm-eval", "mlan-paper", "labels"], help=PROTOCOL_HELP)
    p.add_argument("--chat-template", action="store_true",
                   help="lm-eval protocol: wrap each prompt in the tokenizer's chat template (lm-eval's "
                   "--apply_chat_template)")
    p.add_argument("--reference", default=None, help="results JSON of a reference model (forgetting Δ; default: none)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="items per forward pass")
    p.add_argument("--limit", type=int, default=None, help="the first N items of each task (default: all)")
    p.add_argument("--items", default=None, help="score only these item ids: one per line, or an items.jsonl (default: all)")
    p.add_argument("--nproc", type=positive_int, default=1, help="processes to split the items across (torch.distributed)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="generation length for generative tasks")
    p.add_argument("--images", default=None, help="image root for image tasks (default: the task file's folder)")
    p.add_argument("--image-pattern", default=None, help="image path pattern over record fields and {split}, "
                   "e.g. 'images/{directory}/test1-{identifier}-0.png' (default: the record's image field)")
    p.set_defaults(handler=eval_command)


def eval_command(args: argparse.Namespace) -> int:
    """Print the table; write the results JSON and its per-item file when --out is given."""
    from mlan.errors import UserError
    from mlan.eval.harness import evaluate, format_table, write_results  # lazy (start-up): pulls torch, 2.3 s

    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.nproc < 1:
        raise UserError(f"--nproc must be >= 1, got {args.nproc}")
    kwargs = {"batch_size": args.batch_size, "limit": args.limit, "max_new_tokens": args.max_new_tokens,
                  "images": args.images, "reference": args.reference, "image_pattern": args.image_pattern,
                  "protocol": args.protocol, "chat_template": args.chat_template, "items": args.items}
    if args.nproc > 1:
        from mlan.eval.distributed import evaluate_distributed
        from mlan.eval.harness import is_lm_eval_task

        if any(is_lm_eval_task(t) for t in args.tasks):
            raise UserError("--nproc: lm-eval:NAME tasks run in lm-evaluation-harness's own process; use --nproc 1")

        results = evaluate_distributed(args.model, args.tasks, nproc=args.nproc, **kwargs)
    else:
        results = evaluate(args.model, args.tasks, keep_records=True, **kwargs)
    print(format_table(results))
    if args.out:
        out = Path(args.out)
        write_results(results, out)
        print(f"results: {out}")
    return 0
