"""Benchmark `mlan build` end to end against the raw tokenizer ceiling and a TRL-style baseline, in one run.

Data: the real text sources of ../shared/data (Alpaca, ShareGPT, GSM8K) replicated to ≥ --tokens tokens.
- mlan: `build()` with a fresh cache (Ray actors render + tokenize → Parquet → plan → BFD → tars), tokens/s
  over the whole wall time including Ray start.
- ceiling: the fast tokenizer's `encode_batch` (Rust, all cores) on the same texts, nothing else.
- baseline: `datasets.map(apply_chat_template, num_proc=cores)` then best-fit-decreasing per 1000 examples
  (what TRL's packing does), with its packing efficiency.
- driver peak RSS while planning and packing 1M documents (numpy; measured in a fresh process).

    .venv/bin/python tools/bench_build.py [--tokens 60000000] [--workers N] [--seq-len 4096]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MLAN_SHARED_DATA", REPO.parent / "shared" / "data"))
TEXT_SOURCES = [
    ("alpaca", "text/alpaca_en_demo.json", "alpaca", None),
    ("sharegpt", "text/sharegpt_dummy_conversation.json", "sharegpt", None),
    ("gsm8k", "text/gsm8k_train.jsonl", "template", {"prompts": ["{question}"], "response": "{answer}"}),
]


def replicate(tmp: Path, copies: int) -> list[dict]:
    """Each source written `copies` times into one JSONL (records differ by position only)."""
    specs = []
    for name, rel, fmt, template in TEXT_SOURCES:
        path = DATA / rel
        text = path.read_text()
        records = [json.loads(x) for x in text.splitlines() if x.strip()] if rel.endswith(".jsonl") else json.loads(text)
        out = tmp / f"{name}.jsonl"
        with out.open("w") as f:
            for _ in range(copies):
                for r in records:
                    f.write(json.dumps(r) + "\n")
        spec = {"name": name, "path": str(out), "format": fmt, "modality": "text"}
        if template:
            spec["template"] = template
        specs.append(spec)
    return specs


def chat_messages(spec: dict) -> list[list[dict]]:
    """The same conversations as plain chat messages (for the ceiling and the baseline)."""
    from mlan.recipe import SourceSpec
    from mlan.sources import iter_conversations

    out = []
    for conv in iter_conversations(SourceSpec.model_validate(spec)):
        if isinstance(conv, Exception):
            continue
        out.append([{"role": m.role, "content": m.text} for m in conv.messages])
    return out


def bfd_rows(lengths: list[int], seq_len: int) -> int:
    """Rows used by best-fit decreasing over one batch (the baseline's packer)."""
    import numpy as np

    from mlan.mixture.pack import pack

    return pack(np.minimum(np.asarray(lengths), seq_len), seq_len=seq_len).n_rows


def bench_mlan(specs: list[dict], tokens_budget: int, seq_len: int, workers: int, tmp: Path) -> dict:
    from mlan.mixture.build import build
    from mlan.recipe import parse_recipe

    recipe = parse_recipe({
        "model": {"family": "llava", "tokenizer": "llama3"},
        "sources": specs,
        "mixture": {"budget": {"tokens": tokens_budget}, "ratio": {"text": 1.0}, "seq_len": seq_len, "upsample": True},
        "shards": {"target_tokens": 1_000_000},  # several shards: written in parallel
    }, tmp)
    t0 = time.perf_counter()
    stats = build(recipe, str(tmp / "out"), workers=workers, cache_dir=str(tmp / "cache"), progress=True)
    wall = time.perf_counter() - t0
    cache_tokens = sum(json.loads((p).read_text())["tokens"] for p in (tmp / "cache").rglob("part-*.json"))
    t1 = time.perf_counter()
    build(recipe, str(tmp / "out2"), workers=workers, cache_dir=str(tmp / "cache"), progress=True)
    warm = time.perf_counter() - t1
    import ray  # a cluster that is already up (what `--address` joins): cold cache, no Ray start in the timing

    ray.init(address="local", num_cpus=workers, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    t2 = time.perf_counter()
    build(recipe, str(tmp / "out3"), workers=workers, cache_dir=str(tmp / "cache3"), progress=True)
    running = time.perf_counter() - t2
    ray.shutdown()
    return {"wall": wall, "tokens": cache_tokens, "budget_tokens": stats["tokens"]["total"],
            "efficiency": stats["packing_efficiency"], "warm": warm, "running": running}


def bench_ceiling(convs: list[list[dict]]) -> dict:
    from mlan.tokenizer import load_tokenizer

    tok = load_tokenizer("llama3")
    texts = [tok.apply_chat_template(c, tokenize=False) for c in convs]
    backend = tok.backend_tokenizer
    t0 = time.perf_counter()
    enc = backend.encode_batch(texts, add_special_tokens=False)
    wall = time.perf_counter() - t0
    return {"wall": wall, "tokens": sum(len(e.ids) for e in enc)}


def _template_tokenize(batch, tokenizer_dir: str):
    from transformers import AutoTokenizer

    tok = _template_tokenize.tok = getattr(_template_tokenize, "tok", None) or AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = [tok.apply_chat_template(m, tokenize=True) for m in batch["messages"]]
    ids = [x["input_ids"] if isinstance(x, dict) or hasattr(x, "keys") else x for x in ids]
    return {"input_ids": ids, "length": [len(x) for x in ids]}


def bench_baseline(convs: list[list[dict]], seq_len: int, cores: int, tmp: Path) -> dict:
    """HF datasets.map(apply_chat_template, num_proc=cores) + BFD per 1000 examples (TRL's packing)."""
    import datasets

    from mlan.tokenizer import load_tokenizer

    tok_dir = tmp / "tok"
    load_tokenizer("llama3").save_pretrained(tok_dir)
    ds = datasets.Dataset.from_dict({"messages": convs})
    t0 = time.perf_counter()
    mapped = ds.map(_template_tokenize, batched=True, batch_size=1000, num_proc=cores,
                    fn_kwargs={"tokenizer_dir": str(tok_dir)}, remove_columns=["messages"], load_from_cache_file=False)
    lengths = mapped["length"]
    rows = sum(bfd_rows(lengths[i : i + 1000], seq_len) for i in range(0, len(lengths), 1000))
    wall = time.perf_counter() - t0
    tokens = sum(min(n, seq_len) for n in lengths)
    return {"wall": wall, "tokens": sum(lengths), "efficiency": tokens / (rows * seq_len)}


_RSS_CHILD = r"""
import sys, numpy as np
from mlan.mixture.plan import SourceDocs, make_plan
from mlan.mixture.pack import pack
n = int(sys.argv[1]); rng = np.random.default_rng(0)
text = np.clip(rng.lognormal(5.5, 1.0, int(n * 0.8)), 8, 4096).astype(np.int64)
image = np.clip(rng.lognormal(6.5, 0.3, n - text.size), 8, 4096).astype(np.int64)
def hwm():  # peak RSS of this process in kB (VmHWM: reset at exec, unlike ru_maxrss)
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
before = hwm()
srcs = [SourceDocs("t", "text", 1.0, True, text), SourceDocs("i", "image_text", 1.0, True, image)]
plan = make_plan(srcs, budget_examples=n, ratio_text=0.8, ratio_by="examples")
p = pack(plan.n_tokens, (np.asarray([s.modality for s in srcs])[plan.source] == "image_text").astype(np.int64),
         seq_len=4096)
after = hwm()
print(len(plan), p.n_rows, p.efficiency, before, after)
"""


def bench_plan_rss(n: int) -> dict:
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", _RSS_CHILD, str(n)], capture_output=True, text=True, check=True)
    docs, rows, eff, before, after = out.stdout.split()
    return {"docs": int(docs), "rows": int(rows), "efficiency": float(eff), "rss_before_mb": int(before) / 1024,
            "rss_peak_mb": int(after) / 1024, "wall": time.perf_counter() - t0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=60_000_000,
                    help="replicate the text data to at least this many tokens (≥ 5M; fixed costs dominate small builds)")
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--plan-docs", type=int, default=1_000_000)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="bench_build_") as d:
        tmp = Path(d)
        (tmp / "one").mkdir()
        one = replicate(tmp / "one", 1)
        convs_one = [c for s in one for c in chat_messages(s)]
        ceiling_one = bench_ceiling(convs_one)
        base_tokens = ceiling_one["tokens"]
        copies = -(-args.tokens // base_tokens)
        (tmp / "data").mkdir()
        specs = replicate(tmp / "data", copies)
        convs = convs_one * copies
        print(f"data: {len(convs):,} conversations, {copies} copies of the real text sources, "
              f"cores {cores}, workers {args.workers}", file=sys.stderr)
        ceiling = bench_ceiling(convs)
        print(f"ceiling done: {ceiling}", file=sys.stderr)
        mlan = bench_mlan(specs, ceiling["tokens"], args.seq_len, args.workers, tmp / "mlan")
        print(f"mlan done: {mlan}", file=sys.stderr)
        baseline = bench_baseline(convs, args.seq_len, cores, tmp)
        print(f"baseline done: {baseline}", file=sys.stderr)
        rss = bench_plan_rss(args.plan_docs)

    def rate(r):
        return r["tokens"] / r["wall"]

    ceil = rate(ceiling)
    print()
    print("| run | tokens | wall s | tokens/s | × ceiling | packing efficiency |")
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| tokenizer ceiling (encode_batch, {cores} cores) | {ceiling['tokens']:,} | {ceiling['wall']:.2f} | "
          f"{ceil:,.0f} | 1.00 | — |")
    print(f"| mlan build end to end ({args.workers} workers, cold cache) | {mlan['tokens']:,} | {mlan['wall']:.2f} | "
          f"{rate(mlan):,.0f} | {rate(mlan) / ceil:.2f} | {mlan['efficiency']:.4f} |")
    print(f"| mlan build on a running Ray (cold cache) | {mlan['tokens']:,} | {mlan['running']:.2f} | "
          f"{mlan['tokens'] / mlan['running']:,.0f} | {mlan['tokens'] / mlan['running'] / ceil:.2f} | {mlan['efficiency']:.4f} |")
    print(f"| mlan build, warm cache (plan+pack+write) | {mlan['budget_tokens']:,} | {mlan['warm']:.2f} | "
          f"{mlan['budget_tokens'] / mlan['warm']:,.0f} | {mlan['budget_tokens'] / mlan['warm'] / ceil:.2f} | — |")
    print(f"| baseline datasets.map(num_proc={cores}) + BFD/1000 | {baseline['tokens']:,} | {baseline['wall']:.2f} | "
          f"{rate(baseline):,.0f} | {rate(baseline) / ceil:.2f} | {baseline['efficiency']:.4f} |")
    print()
    print(f"mlan vs baseline: {rate(mlan) / rate(baseline):.2f}× tokens/s; packing {mlan['efficiency']:.4f} vs "
          f"{baseline['efficiency']:.4f}")
    print(f"driver peak RSS planning + packing {rss['docs']:,} documents: {rss['rss_peak_mb']:.0f} MB "
          f"(interpreter + numpy before: {rss['rss_before_mb']:.0f} MB), {rss['rows']:,} rows, "
          f"efficiency {rss['efficiency']:.4f}, {rss['wall']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
