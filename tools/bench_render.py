"""Rendering throughput on real data: mlan's Renderer vs the usual `apply_chat_template(tokenize=True)` per document.

    python tools/bench_render.py [--source gsm8k] [--recipe recipes/shared-data.yaml] [--batch 256]

The baseline produces ids only (no loss mask); the Renderer produces ids, the exact mask, counts and
image data. Both run single-threaded (TOKENIZERS_PARALLELISM=false) on the same conversations, already
read (reading the source is not timed).
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default="recipes/shared-data.yaml")
    ap.add_argument("--source", default="gsm8k")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--template", default=None, help="override model.template")
    args = ap.parse_args()

    from mlan.recipe import load_recipe
    from mlan.render import Renderer
    from mlan.sources import iter_conversations

    overrides = [f"model.template={args.template}"] if args.template else []
    recipe = load_recipe(args.recipe, overrides)
    spec = next(s for s in recipe.sources if s.name == args.source)
    convs = [c for c in iter_conversations(spec) if not isinstance(c, Exception)]
    renderer = Renderer(recipe.model, recipe.mixture.seq_len, recipe.mixture.overlong)
    tok = renderer.tokenizer
    renderer.render_batch(convs[:64])  # warm up

    t0 = time.perf_counter()
    docs = []
    for i in range(0, len(convs), args.batch):
        docs += renderer.render_batch(convs[i : i + args.batch])
    t_batch = time.perf_counter() - t0
    n_tokens = sum(d.n_tokens for d in docs if not isinstance(d, Exception))

    t0 = time.perf_counter()
    for c in convs:
        renderer.render(c)
    t_single = time.perf_counter() - t0

    messages = [[{"role": m.role, "content": m.text} for m in c.messages] for c in convs]
    t0 = time.perf_counter()
    for m in messages:
        tok.apply_chat_template(m, tokenize=True)
    t_base = time.perf_counter() - t0

    n = len(convs)
    print(f"source {args.source}: {n} documents, {n_tokens} tokens, template {renderer.template.name}, "
          f"family {renderer.family.name}")
    print(f"baseline apply_chat_template(tokenize=True), per doc, ids only: {n / t_base:9.0f} docs/s")
    print(f"Renderer.render, per doc, ids + mask + counts:               {n / t_single:9.0f} docs/s "
          f"({t_base / t_single:.2f}x baseline)")
    print(f"Renderer.render_batch({args.batch}), ids + mask + counts:         {n / t_batch:9.0f} docs/s "
          f"({t_base / t_batch:.2f}x baseline), {n_tokens / t_batch / 1e6:.2f} M tokens/s")


if __name__ == "__main__":
    main()
