"""Training throughput: packed rows vs pad-to-longest batches of the *same documents*, same model, same run.

Both arms run the trainer's own step (`mlan.train.trainer.Stepper.step` in a one-process group: forward with
use_cache=False, the loss on loss positions only, backward, clip, AdamW) with the same attention
implementation (`mlan.train.attention.set_attention`, `--attention documents|sdpa`). The documents come from a
`mlan build` (default: recipes/tiny-llava.yaml built here at `--seq-len`):

- packed: the build's packed rows, `--batch-rows` per batch, in the packed loader's seeded order;
- padded: the same rows split back into one document per row, as an unpacked dataset has, sampled in a seeded
  random order (`--padded-order shuffled`; `packed` keeps the packed rows' order) and batched with a fixed
  number of documents per batch, chosen so that both arms have the same average real tokens per batch; each
  batch is padded to its longest document.

Batches of the two arms alternate (after a warm-up of both), so a change in machine load hits both. Real tokens/s
counts sequence tokens, never padding.

Models (`--model`):
- `bench` (default on CPU): the build's family with a body-dominated Llama-3 text model: hidden 512, 8 layers
  (Mllama: 8 self-attention + 2 cross-attention layers, at 3 and 8), 8 heads / 2 KV heads (GQA, head_dim 64),
  MLP 1408, RoPE θ 5e5; the vision tower and projector tiny as in mlan.families.tiny. Its vocabulary is compacted
  to the token ids present in the benchmarked rows (plus the image token), remapped densely, so that — as in a
  real 3B/8B model — the decoder body, not a 128k-row lm_head and its AdamW state, dominates the step. The
  FLOPs-per-token split is printed next to Llama-3.2-3B's at the same lengths.
- `tiny`: the tests' tiny model (2 layers × 64 wide, 128k vocabulary: lm_head- and AdamW-bound).
- `3b` (default on a GPU): a LLaVA with a Llama-3.2-3B-shaped language model (28 × 3072, 24 / 8 KV heads, MLP
  8192, 128,256 + 1 vocabulary) and a CLIP-L-wide tower at the build's image geometry; random weights.

On a GPU the model is wrapped as the trainer wraps it (`mlan.train.parallel.parallelize`: FSDP2 `fully_shard` per
block and root on a one-GPU group, bf16 parameters with fp32 master weights and fp32 reduction), optionally with
activation checkpointing (`--activation-checkpointing`) and per-block `torch.compile` (`--compile`); `--no-fsdp`
runs the plain module under bf16 autocast instead. Each arm reports real tokens/s per GPU, MFU (the trainer's
formula: 6·params + 12·layers·hidden·seq_len FLOPs per real token, over the GPU's dense bf16 peak) and the peak
memory of its steps (CUDA max allocated; process peak RSS on CPU). `--json PATH` also writes the result.

    python tools/bench_train.py                                     # bench model, tiny-llava built at seq 4096
    python tools/bench_train.py --recipe recipes/tiny-mllama.yaml   # the same for Mllama
    python tools/bench_train.py --attention sdpa                    # dense block-diagonal masks instead
    python tools/bench_train.py --shards out/tiny-llava --model tiny
    python tools/bench_train.py --model 3b --batches 10             # GPU: FSDP2 on one GPU, bf16
    python tools/bench_train.py --model 3b --activation-checkpointing --compile --build-dir /tmp/b --json r.json
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mlan.data.collate import family_collate
from mlan.data.loader import RowReader, plan_batches
from mlan.families import modeling, tiny
from mlan.families.mllama.patch import apply_reference_cross_attention
from mlan.families.registry import same_modules_inputs
from mlan.mixture.shards import PackedRow, read_manifest
from mlan.recipe import ModelSpec, TrainSpec
from mlan.train.attention import ATTENTION_CHOICES, set_attention
from mlan.train.metrics import GIB, peak_flops, peak_memory_bytes, reset_peak_memory
from mlan.train.parallel import DistEnv, ParallelConfig, parallelize
from mlan.train.trainer import Stepper


@dataclasses.dataclass(frozen=True)
class TextShape:
    """A Llama-3 text model's shape (vocabulary apart)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def linear_per_layer(self) -> int:
        """q, k, v, o and the SwiGLU MLP weights of one decoder layer."""
        attn = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        return attn + 3 * self.hidden * self.intermediate

    def describe(self) -> str:
        return (f"{self.layers} layers x hidden {self.hidden}, {self.heads} heads / {self.kv_heads} KV heads "
                f"(head_dim {self.head_dim}), MLP {self.intermediate}")


BENCH = TextShape(hidden=512, layers=8, heads=8, kv_heads=2, intermediate=1408)
LLAMA32_3B = TextShape(hidden=3072, layers=28, heads=24, kv_heads=8, intermediate=8192)
LLAMA3_VOCAB = 128256


# ---------------------------------------------------------------- documents and batches
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


def compact_vocabulary(rows: list[PackedRow], fc: dict) -> tuple[list[PackedRow], dict, int]:
    """Remap the rows' token ids densely onto the ids they use: text ids → 0..K-1, the image token → K.

    Returns the remapped rows, a copy of family_config with the new image token id / vocab_size / pad id (for the
    collator and the family's `same_modules_inputs`), and K (the real vocabulary: what the lm_head predicts over)."""
    image = fc.get("image_token_id")
    image = -1 if image is None else int(image)
    used = np.unique(np.concatenate([np.asarray(r.ids, dtype=np.int64) for r in rows]))
    text_ids = used[used != image]
    k = len(text_ids)
    out = []
    for r in rows:
        ids = np.asarray(r.ids, dtype=np.int64)
        new = np.searchsorted(text_ids, ids)
        new[ids == image] = k
        out.append(dataclasses.replace(r, ids=new.astype(np.uint32)))
    has_image_row = int(fc.get("vocab_size") or 0) > image >= 0  # LLaVA: the vocabulary includes the image row
    new_fc = {**fc, "image_token_id": k, "vocab_size": k + 1 if has_image_row else k, "pad_token_id": 0}
    return out, new_fc, k


def collate_all(collate, items: list[PackedRow], per_batch: int) -> list[dict]:
    return [collate(items[i:i + per_batch]) for i in range(0, len(items), per_batch)]


def build_padding(reader: RowReader, plan, batch_docs: int, order: str, seed: int, limit: int = 4000) -> dict:
    """Padding fractions of both arms over the whole build (the first `limit` packed batches), from lengths alone:
    how representative the timed sample is."""
    rows = [[len(reader.read(int(g))) for g in b] for b in plan.rows[:limit]]
    docs = [int(n) for b in plan.rows[:limit] for g in b for n in reader.read(int(g)).docs]
    if order == "shuffled":
        docs = [docs[i] for i in np.random.default_rng(seed).permutation(len(docs))]
    tokens = sum(docs)
    packed = sum(len(b) * max(b) for b in rows)
    padded = sum(len(docs[i:i + batch_docs]) * max(docs[i:i + batch_docs]) for i in range(0, len(docs), batch_docs))
    return {"rows": sum(map(len, rows)), "documents": len(docs), "tokens": tokens,
            "packed_padding_fraction": 1 - tokens / packed, "padded_padding_fraction": 1 - tokens / padded}


def make_build(out: Path, recipe: Path, tokens: int, seq_len: int, extra: list[str]) -> Path:
    from mlan.mixture.build import build
    from mlan.recipe import load_recipe

    r = load_recipe(recipe, [f"mixture.budget.tokens={tokens}", f"mixture.seq_len={seq_len}", *extra])
    build(r, str(out), workers=1, cache_dir=str(out.parent / "cache"), progress=False)
    return out


# ---------------------------------------------------------------- models
def llama_text_config(shape: TextShape, vocab: int, special_ids: bool = True):
    text = tiny.tiny_llama_config(num_layers=shape.layers, hidden=shape.hidden)
    text.intermediate_size, text.num_attention_heads = shape.intermediate, shape.heads
    text.num_key_value_heads, text.head_dim = shape.kv_heads, shape.head_dim
    if not special_ids:  # a compacted vocabulary: the Llama-3 special ids are outside it
        text.pad_token_id = text.bos_token_id = text.eos_token_id = None
    text.vocab_size = vocab
    return text


def build_model(kind: str, fc: dict, real_vocab: int, device: torch.device) -> torch.nn.Module:
    """`tiny`: the tests' model; `bench`: the family with the BENCH text shape over `real_vocab` ids (image token =
    real_vocab); `3b`: LLaVA with a Llama-3.2-3B text model and a CLIP-L-wide tower at the build's image geometry."""
    torch.manual_seed(0)
    family = fc["family"]
    if kind == "tiny":
        return modeling.build_model(ModelSpec(family=family), fc).to(device)
    from transformers import (
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        MllamaForConditionalGeneration,
    )

    if family == "llava":
        size, patch = int(fc["image_size"]), int(fc["patch_size"])
        if kind == "bench":
            cfg = tiny.tiny_llava_config()
            cfg.text_config = llama_text_config(BENCH, real_vocab + 1, special_ids=False)
            cfg.vision_config.image_size, cfg.vision_config.patch_size = size, patch
            cfg.image_token_index, cfg.image_seq_length = real_vocab, int(fc["image_tokens"])
        else:
            vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                      num_attention_heads=16, image_size=size, patch_size=patch, projection_dim=768)
            cfg = LlavaConfig(vision_config=vision, text_config=llama_text_config(LLAMA32_3B, LLAMA3_VOCAB + 1),
                              image_token_index=LLAMA3_VOCAB, image_seq_length=int(fc["image_tokens"]),
                              vision_feature_layer=-2, vision_feature_select_strategy="default")
        with torch.device(device):
            model = LlavaForConditionalGeneration(cfg)
    elif family == "mllama" and kind == "bench":
        cfg = tiny.tiny_mllama_config(num_layers=BENCH.layers + 2, hidden=BENCH.hidden)  # cross at 3 and 8
        t = cfg.text_config
        t.intermediate_size, t.num_attention_heads, t.num_key_value_heads = BENCH.intermediate, BENCH.heads, \
            BENCH.kv_heads
        t.pad_token_id = None  # the Llama-3 special ids are outside the compacted vocabulary (unused in training)
        t.bos_token_id, t.eos_token_id = 0, [0]
        t.vocab_size = real_vocab  # the embedding has 8 more rows: the image token is one
        cfg.image_token_index = real_vocab
        cfg.vision_config.image_size = int(fc.get("tile_size") or cfg.vision_config.image_size)
        cfg.vision_config.patch_size = int(fc.get("patch_size") or cfg.vision_config.patch_size)
        cfg.vision_config.max_num_tiles = int(fc.get("max_tiles") or cfg.vision_config.max_num_tiles)
        with torch.device(device):
            model = apply_reference_cross_attention(MllamaForConditionalGeneration(cfg))
    else:
        raise SystemExit(f"--model {kind}: not available for a {family} build (3b is LLaVA only)")
    return model.to(device)


def body_linear_params(model: torch.nn.Module) -> int:
    """Weights every sequence position goes through in the decoder layers (Mllama's cross-attention k/v excluded:
    they run over image tiles, not text positions)."""
    lm = modeling.module_groups(model)["language_model"][0]
    return sum(m.weight.numel() for name, m in lm.layers.named_modules() if isinstance(m, torch.nn.Linear)
               and not ("cross_attn" in name and name.endswith(("k_proj", "v_proj"))))


def self_attention_layers(model: torch.nn.Module) -> int:
    """Decoder layers that attend over text positions: all but the family's cross-attention layers."""
    groups = modeling.module_groups(model)
    cross = {id(layer) for layer in groups["cross_attention"]}
    return sum(1 for layer in groups["language_model"][0].layers if id(layer) not in cross)


# ---------------------------------------------------------------- FLOPs per real token
def segments(position_ids: torch.Tensor) -> list[int]:
    """Lengths of the runs that restart at position 0, over every row (documents and padding tails)."""
    out = []
    for row in position_ids:
        starts = (row == 0).nonzero().flatten().tolist()
        if not starts or starts[0] != 0:
            starts = [0] + starts
        out += [e - s for s, e in zip(starts, starts[1:] + [row.numel()])]
    return out


def arm_stats(batches: list[dict], fc: dict, attention: str) -> dict:
    """Positions run, loss positions (lm_head rows) and attention score pairs the kernel computes, per arm:
    `documents` computes each run that restarts at position 0 causally (s·(s+1)/2 pairs; a padding tail is one
    such run); `sdpa` with a block-diagonal mask computes every pair of the padded row (L² per row)."""
    positions = loss = pairs = 0
    for b in batches:
        b = {k: v for k, v in b.items() if k != "meta"}
        dummy = same_modules_inputs(b, fc)
        pos = b["position_ids"]
        positions += pos.numel()
        loss += int((b["labels"][:, 1:] != -100).sum()) + (int(dummy.sum()) if dummy is not None else 0)
        if attention == "sdpa":
            pairs += pos.shape[0] * pos.shape[1] ** 2
        else:
            pairs += sum(s * (s + 1) // 2 for s in segments(pos))
    return {"positions": positions, "loss_positions": loss, "attention_pairs": pairs}


def flops_split(stats: dict, tokens: int, body_params: int, attn_layers: int, attn_width: int, vocab: int,
                hidden: int) -> dict:
    """Training FLOPs (3 × forward) per real token: 6·body weights per position run, 12·layers·(heads·head_dim)
    per attention pair (QKᵀ and AV), 6·vocab·hidden per lm_head row (loss positions only)."""
    body = 6.0 * body_params * stats["positions"] / tokens
    attn = 12.0 * attn_layers * attn_width * stats["attention_pairs"] / tokens
    head = 6.0 * vocab * hidden * stats["loss_positions"] / tokens
    total = body + attn + head
    return {"body_linear": body, "attention": attn, "lm_head": head, "total": total}


# ---------------------------------------------------------------- timing
def one_process_group(device: torch.device) -> DistEnv:
    """A world of one, so the trainer's Stepper (which all-gathers counts) runs unchanged."""
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1)
    return DistEnv(rank=0, world_size=1, local_rank=0, device=device)


def timed_step(stepper: Stepper, batch: dict, device: torch.device, dtype: torch.dtype) -> tuple[float, float, int]:
    """Wall seconds, this process's CPU seconds (all threads) and peak memory bytes of one trainer step."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    batch = dict(batch)  # the step pops meta and may append a dummy image
    sync()
    reset_peak_memory(device)
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        stepper.step([batch], 0, 1 << 62, 2e-5, None)
    sync()
    return time.perf_counter() - t0, time.process_time() - c0, peak_memory_bytes(device)


def mega(flops: float) -> str:
    return f"{flops / 1e6:,.{0 if flops >= 1e7 else 1}f} M"


def arm_totals(batches: list[dict]) -> dict:
    return {"batches": len(batches), "tokens": sum(int(b["meta"]["n_tokens"]) for b in batches),
            "padded_tokens": sum(int(b["input_ids"].numel()) for b in batches)}


def main() -> None:
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", default=None, help="a `mlan build` output (default: build --recipe here)")
    ap.add_argument("--recipe", default=str(REPO / "recipes" / "tiny-llava.yaml"), help="recipe built when no "
                    "--shards is given (its mixture at --seq-len and --build-tokens)")
    ap.add_argument("--build-tokens", type=int, default=100000)
    ap.add_argument("--build-set", action="append", default=[], metavar="KEY=VALUE",
                    help="more recipe overrides for that build")
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--model", choices=["bench", "tiny", "3b"], default="3b" if cuda else "bench")
    ap.add_argument("--attention", choices=ATTENTION_CHOICES, default="documents")
    ap.add_argument("--padded-order", choices=["shuffled", "packed"], default="shuffled",
                    help="order the padded arm takes the documents in: a seeded random sample (an unpacked "
                    "loader) or the packed rows' order")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-rows", type=int, default=1, help="packed rows per batch")
    ap.add_argument("--batch-docs", type=int, default=0, help="documents per padded batch (default: the same "
                    "average real tokens per batch as the packed arm)")
    ap.add_argument("--batches", type=int, default=24, help="packed batches timed (padded: the same documents)")
    ap.add_argument("--warmup", type=int, default=2, help="warm-up batches of each arm (other documents)")
    ap.add_argument("--fsdp", action=argparse.BooleanOptionalAction, default=cuda,
                    help="wrap the model as the trainer does (FSDP2 on a one-process group, bf16 on GPU); "
                    "default on a GPU")
    ap.add_argument("--activation-checkpointing", action="store_true", help="per block, as train.activation_"
                    "checkpointing (needs --fsdp)")
    ap.add_argument("--compile", action="store_true", help="torch.compile per block, as train.compile (needs --fsdp)")
    ap.add_argument("--build-dir", default=None, help="build --recipe into this folder (kept) instead of a "
                    "temporary one; reused when it already holds a manifest.json")
    ap.add_argument("--json", default=None, help="also write the result to this file")
    args = ap.parse_args()
    if (args.activation_checkpointing or args.compile) and not args.fsdp:
        raise SystemExit("--activation-checkpointing and --compile wrap the model as the trainer does: add --fsdp")

    device = torch.device("cuda" if cuda else "cpu")
    # FSDP2's MixedPrecisionPolicy makes the bf16 compute copies itself; without it, bf16 autocast on a GPU
    dtype = torch.bfloat16 if cuda and not args.fsdp else torch.float32
    tmp = tempfile.TemporaryDirectory()
    if args.shards:
        shards = Path(args.shards)
    elif args.build_dir and (Path(args.build_dir) / "manifest.json").is_file():
        shards = Path(args.build_dir)
    else:
        shards = make_build(Path(args.build_dir) if args.build_dir else Path(tmp.name) / "build",
                            Path(args.recipe), args.build_tokens, args.seq_len, args.build_set)
    manifest = read_manifest(str(shards))
    fc = dict(manifest.family_config)
    seq_len = manifest.seq_len
    reader = RowReader(manifest.shards)
    n_batches = args.warmup + args.batches
    plan = plan_batches(len(reader), 0, 1, args.batch_rows, args.seed)  # the packed loader's order, world of one
    if len(plan) < n_batches:
        raise SystemExit(f"{shards}: {len(reader)} rows make {len(plan)} batches of {args.batch_rows}; "
                         f"--warmup + --batches = {n_batches} (raise --build-tokens)")
    row_groups = [[reader.read(int(g)) for g in plan.rows[b]] for b in range(n_batches)]
    rows = [r for group in row_groups for r in group]
    real_vocab = 0  # tiny, 3b: the model's
    if args.model == "bench":
        rows, fc, real_vocab = compact_vocabulary(rows, fc)
    w = args.warmup * args.batch_rows
    collate = family_collate(fc, seq_len=seq_len)
    packed_warm = collate_all(collate, rows[:w], args.batch_rows)
    packed = collate_all(collate, rows[w:], args.batch_rows)
    docs = [d for r in rows[w:] for d in split_documents(r)]
    warm_docs = [d for r in rows[:w] for d in split_documents(r)]
    if args.padded_order == "shuffled":
        rng = np.random.default_rng(args.seed)
        docs = [docs[i] for i in rng.permutation(len(docs))]
        warm_docs = [warm_docs[i] for i in rng.permutation(len(warm_docs))]
    batch_docs = args.batch_docs or max(1, round(len(docs) / len(packed)))  # same real tokens per batch on average
    padded = collate_all(collate, docs, batch_docs)
    padded_warm = collate_all(collate, warm_docs, max(1, round(len(warm_docs) / max(1, len(packed_warm)))))

    model = build_model(args.model, fc, real_vocab, device)
    set_attention(model, args.attention)
    modeling.apply_freeze(model, modeling.freeze_policy("stage2", None))
    assert real_vocab in (0, modeling.real_vocab_size(model)), (modeling.real_vocab_size(model), real_vocab)
    real_vocab = modeling.real_vocab_size(model)
    spec = TrainSpec()
    env = one_process_group(device)
    flops_model = modeling.flops_model(model)  # before sharding: full parameter counts
    if args.fsdp:
        parallelize(model, ParallelConfig(precision="bf16" if cuda else "fp32",
                                          activation_checkpointing=args.activation_checkpointing,
                                          compile=args.compile))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-5, foreach=True)
    stepper = Stepper(model, optimizer, env, spec, real_vocab, fc)
    model.train()

    text = model.config.get_text_config()
    shape = TextShape(text.hidden_size, text.num_hidden_layers, text.num_attention_heads,
                      getattr(text, "num_key_value_heads", text.num_attention_heads), text.intermediate_size)
    body = body_linear_params(model)
    head_params = model.get_output_embeddings().weight.numel()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"model {args.model} ({fc['family']}): text {shape.describe()}; {self_attention_layers(model)} "
          f"self-attention layers; vocabulary {real_vocab:,} real ids"
          f"{f' (compacted from {LLAMA3_VOCAB:,})' if args.model == 'bench' else ''}; body linear {body / 1e6:.1f}M, "
          f"lm_head {head_params / 1e6:.1f}M, trainable {trainable / 1e6:.1f}M params; attention {args.attention}, "
          f"{device}, {'FSDP2 ' + ('bf16' if cuda else 'fp32') if args.fsdp else dtype}"
          f"{', activation checkpointing' if args.activation_checkpointing else ''}"
          f"{', compile' if args.compile else ''}".replace("torch.", ""), flush=True)

    packed_r, padded_r = arm_totals(packed), arm_totals(padded)
    assert packed_r["tokens"] == padded_r["tokens"], "both arms must train on the same documents"
    for b in packed_warm:
        timed_step(stepper, b, device, dtype)
    for b in padded_warm:
        timed_step(stepper, b, device, dtype)
    seconds = {"packed": [0.0, 0.0], "padded": [0.0, 0.0]}
    peak_mem = {"packed": 0, "padded": 0}
    for pair in itertools.zip_longest(packed, padded):  # alternate: machine load changes hit both arms
        for arm, b in zip(("packed", "padded"), pair):
            if b is not None:
                wall, cpu, mem = timed_step(stepper, b, device, dtype)
                seconds[arm][0] += wall
                seconds[arm][1] += cpu
                peak_mem[arm] = max(peak_mem[arm], mem)

    attn_layers = self_attention_layers(model)
    result = {"model": args.model, "family": fc["family"], "device": str(device), "dtype": str(dtype),
              "seq_len": seq_len, "attention": args.attention, "padded_order": args.padded_order,
              "fsdp": args.fsdp, "activation_checkpointing": args.activation_checkpointing, "compile": args.compile,
              "gpu": torch.cuda.get_device_name(device) if cuda else None,
              "text_shape": dataclasses.asdict(shape), "real_vocab": real_vocab, "documents": len(docs),
              "batch_rows": args.batch_rows, "padded_batch_docs": batch_docs,
              "packed": packed_r, "padded": padded_r, "flops_per_real_token": {}}
    for arm, batches in (("packed", packed), ("padded", padded)):
        r = result[arm]
        r["seconds"], r["cpu_seconds"] = seconds[arm]
        r["tokens_per_s"] = r["tokens"] / r["seconds"]
        r["padding_fraction"] = 1 - r["tokens"] / r["padded_tokens"]
        r["peak_memory_gib"] = peak_mem[arm] / GIB
        stats = arm_stats(batches, fc, args.attention)
        result["flops_per_real_token"][arm] = {
            "model": flops_split(stats, r["tokens"], body, attn_layers, shape.heads * shape.head_dim, real_vocab,
                                 shape.hidden),
            "llama-3.2-3b": flops_split(stats, r["tokens"], LLAMA32_3B.layers * LLAMA32_3B.linear_per_layer,
                                        LLAMA32_3B.layers, LLAMA32_3B.hidden, LLAMA3_VOCAB, LLAMA32_3B.hidden),
        }
    result["speedup"] = result["packed"]["tokens_per_s"] / result["padded"]["tokens_per_s"]
    fl = result["flops_per_real_token"]
    result["flops_ratio"] = fl["padded"]["model"]["total"] / fl["packed"]["model"]["total"]
    result["flops_ratio_llama32_3b"] = fl["padded"]["llama-3.2-3b"]["total"] / fl["packed"]["llama-3.2-3b"]["total"]
    result["build_wide"] = build_padding(reader, plan, batch_docs, args.padded_order, args.seed)
    peak = peak_flops(device)
    if peak:  # the trainer's MFU: model FLOPs of the real tokens (6·params + 12·layers·hidden·seq_len) per second
        per_token = flops_model.per_token(seq_len)
        for arm in ("packed", "padded"):
            result[arm]["mfu"] = per_token * result[arm]["tokens_per_s"] / peak
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))

    print(f"\nTraining FLOPs per real token, {args.attention} attention (6·weights per position run incl. padding, "
          "12·layers·width per attention pair, 6·vocab·hidden per loss position; the vision tower left out):\n")
    print("| model | arm | body linear | attention | lm_head | body share |")
    print("|---|---|---:|---:|---:|---:|")
    for name, label in (("model", f"{args.model} ({real_vocab:,} ids)"),
                        ("llama-3.2-3b", "Llama-3.2-3B shape (128,256 ids)")):
        for arm in ("packed", "padded"):
            f = result["flops_per_real_token"][arm][name]
            print(f"| {label} | {arm} | {mega(f['body_linear'])} | {mega(f['attention'])} | {mega(f['lm_head'])} | "
                  f"{f['body_linear'] / f['total']:.0%} |")
    print(f"\n{args.model} model, {fc['family']}, seq_len {seq_len}, {args.attention} attention, padded order "
          f"{args.padded_order}, {len(docs)} documents, {args.batch_rows} packed row(s) / {batch_docs} documents "
          f"per batch:\n")
    print("| arm | batches | real tokens | padded tokens | padding | seconds | CPU s | real tok/s/GPU | MFU | "
          "peak memory |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for arm, label in (("packed", "packed rows"), ("padded", "pad-to-longest")):
        r = result[arm]
        mfu = f"{r['mfu']:.1%}" if "mfu" in r else "n/a"
        print(f"| {label} | {r['batches']} | {r['tokens']:,} | {r['padded_tokens']:,} | "
              f"{r['padding_fraction']:.1%} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} | "
              f"{r['tokens_per_s']:,.0f} | {mfu} | {r['peak_memory_gib']:.2f} GiB |")
    bw = result["build_wide"]
    print(f"\nspeedup from packing: {result['speedup']:.2f}x (FLOPs per real token, padded / packed: "
          f"{result['flops_ratio']:.2f} for this model, {result['flops_ratio_llama32_3b']:.2f} for the Llama-3.2-3B "
          "shape)")
    print(f"(the whole build, {bw['rows']} rows / {bw['documents']} documents batched the same way, lengths only: "
          f"packed padding {bw['packed_padding_fraction']:.1%}, pad-to-longest {bw['padded_padding_fraction']:.1%})")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
