"""lm-evaluation-harness (HF backend, fp32, batch 8) and `mlan eval` (lm-eval protocol) on the same model and
items, in one process: items/s of each, their ratio, both scores with Wilson intervals, and whether every
prediction (acc and acc_norm) agrees and the log-likelihoods are within 1e-3.

    PYTHONPATH=. python tools/bench_eval.py --model smollm2-135m-instruct \
        --task ../shared/data/eval/arc-easy_test.json --limit 300

Each side's time is its whole call: model load, tokenization and scoring. The machine's load average is
printed before and after (a shared machine's numbers are only comparable within one run).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # lmeval_reference: lm-eval's own task YAMLs over local docs

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: list[str] | None = None) -> int:
    import lmeval_reference

    from mlan.eval.harness import evaluate
    from mlan.eval.protocols import lm_eval_doc, parse_adapters
    from mlan.eval.stats import wilson_ci
    from mlan.eval.tasks import load_task
    from mlan.pretrained import resolve_model_path

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--task", default=str(REPO.parent / "shared" / "data" / "eval" / "arc-easy_test.json"))
    ap.add_argument("--limit", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=8, help="lm-eval's batch (requests) and mlan's (items)")
    args = ap.parse_args(argv)

    model = resolve_model_path(args.model)
    task = load_task(args.task, limit=args.limit)
    records = json.loads(Path(args.task).read_text())[: args.limit]
    docs = [lm_eval_doc(task.style, parse_adapters(r["instruction"], r["answer"])) for r in records]
    n = len(task.items)
    print(f"model {args.model}, task {task.name} ({task.style} prompt), {n} items, load {os.getloadavg()}",
          flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        ref = lmeval_reference.run(model, {task.name: (task.style, docs)}, Path(tmp), batch_size=args.batch_size)
        t_ref = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = evaluate(model, [args.task], batch_size=args.batch_size, limit=args.limit, keep_records=True)
    t_mlan = time.perf_counter() - t0
    mine = res["tasks"][task.name]["records"]

    agree = all(r["correct"] == bool(w["acc"]) for r, w in zip(mine, ref[task.name]))
    agree_norm = all(w["acc_norm"] is None or r["correct_norm"] == bool(w["acc_norm"])
                     for r, w in zip(mine, ref[task.name]))
    worst = max(abs(a - b) for r, w in zip(mine, ref[task.name]) for a, b in zip(r["loglik"], w["lls"]))
    same_pred = all(max(range(len(w["lls"])), key=lambda j, w=w: (w["lls"][j], -j)) == r["loglik"].index(
        max(r["loglik"])) for r, w in zip(mine, ref[task.name]))

    def score(k: int) -> str:
        lo, hi = wilson_ci(k, n)
        return f"{100 * k / n:.2f} % [{lo:.1f}, {hi:.1f}]"

    ref_acc = sum(bool(w["acc"]) for w in ref[task.name])
    ref_norm = sum(bool(w["acc_norm"]) for w in ref[task.name] if w["acc_norm"] is not None)
    print(f"lm-evaluation-harness 0.4.13: {t_ref:7.1f} s  {n / t_ref:6.2f} items/s  acc {score(ref_acc)}  "
          f"acc_norm {score(ref_norm)}")
    print(f"mlan eval (lm-eval):          {t_mlan:7.1f} s  {n / t_mlan:6.2f} items/s  "
          f"acc {score(sum(r['correct'] for r in mine))}  acc_norm {score(sum(r['correct_norm'] for r in mine))}")
    print(f"speed-up {t_ref / t_mlan:.2f}x; predictions agree: acc {agree and same_pred}, acc_norm {agree_norm}; "
          f"max |Δ log-likelihood| {worst:.2e} nats; load {os.getloadavg()}")
    return 0 if agree and agree_norm and same_pred and worst <= 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
