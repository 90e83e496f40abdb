"""Invariant 5: a text-only micro-batch on one rank and an image micro-batch on the other do not hang FSDP2.

Two real gloo processes shard a tiny Mllama with `fully_shard` (every decoder layer, the vision model, the
root) and run forward + backward. The Mllama collator gives the text-only batch a fully masked dummy image,
so both ranks run the vision model and every cross-attention layer (the same collectives); the reference
cross-attention patch makes that dummy image an exact no-op (tests/data/test_isolation.py), which each rank
checks here too against its unsharded loss.
"""
from __future__ import annotations

import json
import os
import socket
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from shardkit import MLLAMA_FC, make_doc, pack


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batch(rank: int, dummy_image: bool = True) -> dict:
    from mlan.data.collate import family_collate

    rng = np.random.default_rng(100 + rank)
    if rank == 0:  # text only
        docs = [make_doc(rng, 20), make_doc(rng, 16)]
    else:
        docs = [make_doc(rng, 18, (4,), image_sizes=((120, 60),)), make_doc(rng, 14)]
    return family_collate(MLLAMA_FC, always_images=dummy_image)([pack(docs, f"r{rank}")])


def _worker(rank: int, world: int, port: int, out: str, dummy_image: bool = True) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.distributed.fsdp import fully_shard
    from transformers import MllamaForConditionalGeneration

    from mlan.families import tiny
    from mlan.families.mllama.patch import apply_reference_cross_attention

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=30))
    try:
        torch.manual_seed(0)
        model = MllamaForConditionalGeneration(tiny.tiny_mllama_config())
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
                    p.fill_(0.5)
        apply_reference_cross_attention(model)
        batch = _batch(rank, dummy_image)
        meta = batch.pop("meta")
        labels = batch.pop("labels")

        def loss_of(m) -> torch.Tensor:
            logits = m(**batch, use_cache=False).logits
            return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=-100, reduction="sum")

        with torch.no_grad():
            unsharded = float(loss_of(model))
        for layer in model.model.language_model.layers:
            fully_shard(layer)
        fully_shard(model.model.vision_model)
        fully_shard(model)
        loss = loss_of(model)
        loss.backward()
        grad_sq = sum(float(p.grad.full_tensor().pow(2).sum()) for p in model.parameters() if p.grad is not None)
        done = torch.tensor([1.0])
        dist.all_reduce(done)
        Path(out, f"rank{rank}.json").write_text(json.dumps({
            "loss": float(loss), "unsharded": unsharded, "grad_sq": grad_sq, "done": float(done),
            "n_images": meta["n_images"],
        }))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_text_only_rank_and_image_rank_do_not_hang(tmp_path):
    import torch.multiprocessing as mp

    assert not _batch(0)["cross_attention_mask"].any() and _batch(1)["cross_attention_mask"].any()
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["done"] for r in results] == [2.0, 2.0]
    assert [r["n_images"] for r in results] == [0, 1]
    for r in results:
        assert np.isfinite(r["loss"]) and np.isfinite(r["grad_sq"]) and r["grad_sq"] > 0
        assert abs(r["loss"] - r["unsharded"]) <= 1e-4 * abs(r["unsharded"])


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_without_the_dummy_image_ranks_diverge(tmp_path):
    """Control: a text-only batch without images makes Mllama skip cross-attention, and the ranks' collectives
    stop matching (gloo aborts on the size mismatch or times out; NCCL would hang)."""
    import torch.multiprocessing as mp

    assert "pixel_values" not in _batch(0, dummy_image=False)
    with pytest.raises((mp.ProcessRaisedException, mp.ProcessExitedException)):
        mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path), False), nprocs=2, join=True,
                           start_method="spawn")
    assert not all((tmp_path / f"rank{r}.json").exists() for r in range(2))
