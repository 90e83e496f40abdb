"""Packing against its bound: rows, bound, efficiency for real builds, and the 1M-document plan+pack time.

The bound is max(⌈tokens / seq_len⌉, ⌈images / max_images_per_row⌉) rows. The baseline, measured in the
same run on the same planned documents, is the length-only best-fit-decreasing order (mlan before the
image-aware order). Builds use the shipped recipes as they are (tokenized caches under --cache are reused).

    PYTHONPATH=$PWD .venv/bin/python tools/bench_pack.py [--recipes tiny-llava tiny-mllama shared-data]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def planned(recipe, cache: str):
    """The build's planned documents (lengths, images per document), from its (already filled) cache."""
    from mlan.mixture.build import source_arrays, source_docs
    from mlan.mixture.plan import make_plan
    from mlan.mixture.tokenize import tokenize_sources

    mix = recipe.mixture
    caches = tokenize_sources(recipe, cache, 1, progress=False)  # every source a cache hit: no work
    arrays, _ = source_arrays(recipe, caches)
    plan = make_plan(source_docs(recipe, arrays), budget_tokens=mix.budget.tokens,
                     budget_examples=mix.budget.examples, ratio_text=mix.ratio.text, ratio_by=mix.ratio.by,
                     seed=mix.seed)
    images = np.concatenate([arrays[s]["n_images"] for s in range(len(arrays))])
    base = np.cumsum([0] + [len(a["n_tokens"]) for a in arrays])[:-1]
    return plan.n_tokens, images[base[plan.source] + plan.doc].astype(np.int64)


def figures(lengths: np.ndarray, images: np.ndarray, seq_len: int, max_images: int) -> dict:
    from mlan.mixture.pack import _bfd, pack, row_bound

    t0 = time.perf_counter()
    p = pack(lengths, images, seq_len=seq_len, max_images=max_images)
    t1 = time.perf_counter()
    base_rows = len(_bfd(lengths, images, seq_len, max_images))  # the length-only order (baseline)
    t2 = time.perf_counter()
    bound = row_bound(int(lengths.sum()), int(images.sum()), seq_len, max_images)
    tokens = int(lengths.sum())
    return {"rows": p.n_rows, "bound": bound, "eff": tokens / (p.n_rows * seq_len), "base_rows": base_rows,
            "base_eff": tokens / (base_rows * seq_len), "pack_s": t1 - t0, "base_s": t2 - t1}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", nargs="*", default=["tiny-llava", "tiny-mllama", "shared-data"])
    ap.add_argument("--cache", default=None, help="tokenized cache (default: a temporary folder)")
    ap.add_argument("--docs", type=int, default=1_000_000, help="documents for the plan+pack timing")
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from mlan.mixture.build import build
    from mlan.mixture.plan import SourceDocs, make_plan
    from mlan.recipe import load_recipe

    print("| build | documents | rows | bound | rows / bound | efficiency | length-only rows (baseline) | "
          "baseline efficiency | baseline rows / mlan rows |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory(prefix="bench_pack_") as tmp:
        cache = args.cache or str(Path(tmp) / "cache")
        for name in args.recipes:
            recipe = load_recipe(REPO / "recipes" / f"{name}.yaml")
            stats = build(recipe, str(Path(tmp) / name), workers=args.workers, cache_dir=cache, progress=False)
            lengths, images = planned(recipe, cache)
            f = figures(lengths, images, recipe.mixture.seq_len, recipe.mixture.max_images_per_row)
            assert f["rows"] == stats["rows"], (f["rows"], stats["rows"])  # the same documents as the build
            print(f"| {name} | {lengths.size:,} | {f['rows']:,} | {f['bound']:,} | {f['rows'] / f['bound']:.4f} | "
                  f"{f['eff']:.4f} | {f['base_rows']:,} | {f['base_eff']:.4f} | {f['base_rows'] / f['rows']:.3f} |")

    # 1M documents: 80% text (lognormal lengths), 20% one-image documents, rows of 4096 tokens, ≤ 8 images
    rng = np.random.default_rng(0)
    n = args.docs
    text = np.clip(rng.lognormal(5.5, 1.0, int(n * 0.8)), 8, 4096).astype(np.int64)
    image = np.clip(rng.lognormal(6.5, 0.3, n - text.size), 8, 4096).astype(np.int64)
    t0 = time.perf_counter()
    srcs = [SourceDocs("t", "text", 1.0, True, text), SourceDocs("i", "image_text", 1.0, True, image)]
    plan = make_plan(srcs, budget_examples=n, ratio_text=0.8, ratio_by="examples")
    t_plan = time.perf_counter() - t0
    images = (plan.source == 1).astype(np.int64)
    f = figures(plan.n_tokens, images, 4096, 8)
    print()
    print(f"{n:,} documents: plan {t_plan:.2f} s + pack {f['pack_s']:.2f} s = {t_plan + f['pack_s']:.2f} s "
          f"(baseline length-only pack {f['base_s']:.2f} s; ratio {f['pack_s'] / f['base_s']:.2f}×); "
          f"{f['rows']:,} rows, bound {f['bound']:,}, efficiency {f['eff']:.4f} (baseline {f['base_eff']:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
