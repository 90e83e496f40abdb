"""Run under `torchrun --nproc-per-node 2`: FSDP2 gradients of the tiny LLaVA vs the unsharded model's.

Each rank feeds one row (with an image) through the FSDP2-wrapped model (mlan's `parallelize`, gradients
summed); rank 0 also runs both rows through a plain, unwrapped copy built from the same seed and compares
every parameter's full gradient. Writes {"max_abs_diff", "max_abs_grad", "view_warnings", "n_params"} to argv[1].
"""
from __future__ import annotations

import json
import sys
import warnings

import torch
import torch.distributed as dist

from mlan.families import tiny
from mlan.recipe import parse_recipe
from mlan.train.losses import IGNORE_INDEX, shift_labels, target_loss_sum
from mlan.train.model import prepare_model
from mlan.train.parallel import ParallelConfig, init_distributed, parallelize

FC = {
    "family": "llava", "vocab_size": tiny.LLAMA3_VOCAB + 1, "image_token_id": tiny.IMAGE_TOKEN_ID,
    "image_tokens": tiny.TINY_LLAVA_IMAGE_TOKENS, "image_size": tiny.TINY_LLAVA_IMAGE_SIZE,
    "patch_size": tiny.TINY_LLAVA_PATCH, "tile_size": None, "max_tiles": None,
}
RECIPE = {"model": {"family": "llava", "config": "tiny"}, "train": {"stage": "stage2", "seed": 7}}


def rows() -> list[dict[str, torch.Tensor]]:
    """Two rows of 8 text tokens around one image's placeholders, each with a random picture."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for r in range(2):
        text = torch.randint(10, 5000, (8,), generator=gen)
        ids = torch.cat([text[:3], torch.full((FC["image_tokens"],), FC["image_token_id"]), text[3:]])[None]
        out.append({"input_ids": ids, "position_ids": torch.arange(ids.shape[1])[None],
                    "pixel_values": torch.rand(1, 3, FC["image_size"], FC["image_size"], generator=gen),
                    "labels": torch.where(ids == FC["image_token_id"], IGNORE_INDEX, ids)})
    return out


def loss_sum(model: torch.nn.Module, row: dict[str, torch.Tensor], vocab: int) -> torch.Tensor:
    targets = shift_labels(row["labels"])
    keep = targets != IGNORE_INDEX
    inputs = {k: v for k, v in row.items() if k != "labels"}
    logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits
    return target_loss_sum(logits, targets[keep], vocab, 0.0)


def main(out: str) -> None:
    env = init_distributed()
    recipe = parse_recipe(RECIPE)
    data = rows()
    denom = float(sum(int((shift_labels(r["labels"]) != IGNORE_INDEX).sum()) for r in data))
    model = prepare_model(recipe, FC)
    vocab = model.get_input_embeddings().weight.shape[0] - 1
    parallelize(model, ParallelConfig())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (loss_sum(model, data[env.rank], vocab) / denom).backward()
    views = [str(w.message) for w in caught if "returned a view tensor" in str(w.message)]
    sharded = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
    counts = [None] * env.world_size
    dist.all_gather_object(counts, len(views))
    if env.is_main:
        plain = prepare_model(recipe, FC)
        for row in data:
            (loss_sum(plain, row, vocab) / denom).backward()
        ref = {n: p.grad for n, p in plain.named_parameters() if p.grad is not None}
        assert set(ref) == set(sharded), sorted(set(ref) ^ set(sharded))[:5]
        diff = max(float((sharded[n] - ref[n]).abs().max()) for n in ref)
        scale = max(float(ref[n].abs().max()) for n in ref)
        with open(out, "w") as f:
            json.dump({"max_abs_diff": diff, "max_abs_grad": scale, "view_warnings": sum(counts),
                       "n_params": len(ref)}, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
