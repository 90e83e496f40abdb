"""Training throughput: packed rows vs pad-to-longest batches of the *same documents*, same model, same run.

Both arms run the trainer's own step (forward with use_cache=False, the loss on loss positions only,
backward, clip, AdamW) on one process; the documents come from a `mlan build` (its packed rows, and the
same rows split back into one document per row for the baseline). Real tokens/s counts sequence tokens,
never padding. With --model 3b on a GPU: a LLaVA with a Llama-3.2-3B-shaped language model (random
weights, no download) in bf16, reporting tokens/s/GPU and MFU as well.

    python tools/bench_train.py --shards out/tiny-llava            # an existing build
    python tools/bench_train.py                                    # builds recipes/tiny-llava.yaml (small)
    python tools/bench_train.py --model 3b --seq-len 4096 --batches 10   # GPU
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mlan.data.collate import family_collate
from mlan.data.loader import RowReader, manifest_shards, read_manifest
from mlan.families import modeling
from mlan.mixture.shards import PackedRow
from mlan.recipe import ModelSpec
from mlan.train.losses import IGNORE_INDEX, shift_labels, target_loss_sum
from mlan.train.metrics import peak_flops
from mlan.train.trainer import add_llava_dummy_image


def split_documents(row: PackedRow) -> list[PackedRow]:
    """One packed row → one row per document (with that document's images), as an unpacked dataset has."""
    out, start = [], 0
    for d, n in enumerate(row.docs.tolist()):
        imgs = [i for i, doc in enumerate(row.image_docs) if doc == d]
        out.append(PackedRow(
            ids=row.ids[start:start + n], loss=row.loss[start:start + n], docs=np.array([n], dtype=np.uint32),
            doc_ids=[row.doc_ids[d]], sources=[row.sources[d]], modalities=[row.modalities[d]],
            images=[row.images[i] for i in imgs], image_exts=[row.image_exts[i] for i in imgs],
            image_docs=[0] * len(imgs), key=f"{row.key}/{d}"))
        start += n
    return out


def make_build(out: Path, tokens: int, seq_len: int) -> Path:
    from mlan.mixture.build import build
    from mlan.recipe import load_recipe

    recipe = load_recipe(REPO / "recipes" / "tiny-llava.yaml",
                         [f"mixture.budget.tokens={tokens}", f"mixture.seq_len={seq_len}"])
    build(recipe, str(out), workers=1, cache_dir=str(out.parent / "cache"), progress=False)
    return out


def build_model(kind: str, family_config: dict, device: torch.device) -> torch.nn.Module:
    """The tiny model of the build's family, or a 3B-class LLaVA (Llama-3.2-3B text shape, CLIP-L/336)."""
    torch.manual_seed(0)
    if kind == "tiny":
        model = modeling.build_model(ModelSpec(family=family_config["family"]), family_config)
    else:
        from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

        from mlan.families.tiny import tiny_llama_config

        text = tiny_llama_config(num_layers=28, hidden=3072, vocab_size=128257)
        text.intermediate_size, text.num_attention_heads, text.num_key_value_heads = 8192, 24, 8
        text.head_dim = 128
        vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                  num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
        cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=128256, image_seq_length=576,
                          vision_feature_layer=-2, vision_feature_select_strategy="default")
        with torch.device(device):
            model = LlavaForConditionalGeneration(cfg)
    modeling.apply_freeze(model, modeling.freeze_policy("stage2", None))
    return model.to(device)


def run_arm(model, optimizer, batches, fc, device, real_vocab, dtype) -> dict:
    """Train on `batches`; returns real tokens, padded tokens and seconds."""
    tokens = padded = 0
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for batch in batches:
        batch = {k: v for k, v in batch.items()}
        meta = batch.pop("meta")
        tokens += int(meta["n_tokens"])
        padded += int(batch["input_ids"].numel())
        dummy = add_llava_dummy_image(batch, fc)
        batch = {k: v.to(device) for k, v in batch.items()}
        targets = shift_labels(batch.pop("labels"))
        keep = targets != IGNORE_INDEX
        if dummy is not None:
            keep = keep | dummy.to(device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            logits = model(**batch, use_cache=False, logits_to_keep=keep).logits
        loss = target_loss_sum(logits, targets[keep], real_vocab) / max(1, int((targets != IGNORE_INDEX).sum()))
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    sync()
    return {"tokens": tokens, "padded_tokens": padded, "seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", default=None, help="a `mlan build` output (default: build tiny-llava here)")
    ap.add_argument("--model", choices=["tiny", "3b"], default="tiny")
    ap.add_argument("--build-tokens", type=int, default=40000)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batch-rows", type=int, default=2, help="packed rows per batch")
    ap.add_argument("--batch-docs", type=int, default=0, help="documents per padded batch (default: same "
                    "average real tokens per batch as the packed arm)")
    ap.add_argument("--batches", type=int, default=12, help="packed batches timed (padded: the same documents)")
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tmp = tempfile.TemporaryDirectory()
    shards = Path(args.shards) if args.shards else make_build(Path(tmp.name) / "build", args.build_tokens,
                                                              args.seq_len)
    manifest = read_manifest(str(shards))
    fc = manifest["family_config"]
    reader = RowReader(manifest_shards(str(shards), manifest))
    n_rows = (args.warmup + args.batches) * args.batch_rows
    rows = [reader.read(i) for i in range(min(n_rows, len(reader)))]
    collate = family_collate(fc, seq_len=int(manifest["seq_len"]))
    packed = [collate(rows[i:i + args.batch_rows]) for i in range(0, len(rows), args.batch_rows)]
    docs = [d for r in rows[args.warmup * args.batch_rows:] for d in split_documents(r)]
    warm_docs = [d for r in rows[:args.warmup * args.batch_rows] for d in split_documents(r)]
    per_doc = sum(len(d) for d in docs) / max(1, len(docs))
    batch_docs = args.batch_docs or max(1, round(args.batch_rows * int(manifest["seq_len"]) / per_doc))
    padded = [collate(docs[i:i + batch_docs]) for i in range(0, len(docs), batch_docs)]
    padded_warm = [collate(warm_docs[i:i + batch_docs]) for i in range(0, len(warm_docs), batch_docs)]

    model = build_model(args.model, fc, device)
    real_vocab = modeling.real_vocab_size(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    model.train()
    run_arm(model, optimizer, packed[:args.warmup], fc, device, real_vocab, dtype)
    run_arm(model, optimizer, padded_warm, fc, device, real_vocab, dtype)
    packed_r = run_arm(model, optimizer, packed[args.warmup:], fc, device, real_vocab, dtype)
    padded_r = run_arm(model, optimizer, padded, fc, device, real_vocab, dtype)
    assert packed_r["tokens"] == padded_r["tokens"], "both arms must train on the same documents"

    result = {"model": args.model, "device": str(device), "seq_len": manifest["seq_len"], "documents": len(docs),
              "packed": packed_r, "padded": padded_r, "padded_batch_docs": batch_docs}
    for arm in ("packed", "padded"):
        r = result[arm]
        r["tokens_per_s"] = r["tokens"] / r["seconds"]
        r["padding_fraction"] = 1 - r["tokens"] / r["padded_tokens"]
    result["speedup"] = result["packed"]["tokens_per_s"] / result["padded"]["tokens_per_s"]
    peak = peak_flops(device)
    if peak:
        fm = modeling.flops_model(model)
        result["packed"]["mfu"] = fm.per_token(int(manifest["seq_len"])) * result["packed"]["tokens_per_s"] / peak
    print(json.dumps(result, indent=1))
    p, q = result["packed"], result["padded"]
    print(f"packed {p['tokens_per_s']:,.0f} real tok/s (padding {p['padding_fraction']:.1%}) vs pad-to-longest "
          f"{q['tokens_per_s']:,.0f} real tok/s (padding {q['padding_fraction']:.1%}) over {len(docs)} documents, "
          f"{p['tokens']:,} tokens: {result['speedup']:.2f}x from packing")


if __name__ == "__main__":
    main()
