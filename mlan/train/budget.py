"""The exact token budget: how many sequence tokens a run trains on, and how the last step is cut to it.

Before each step the ranks all-gather their micro-batches' token counts; when the step would pass the
budget, the remaining tokens are dealt in (micro-batch, rank) order and each micro-batch keeps only its
share (later positions get no loss and are not counted: causal attention means the kept positions see
exactly what a physically truncated row would).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mlan.data.labels import IGNORE_INDEX
from mlan.errors import TrainError
from mlan.recipe import RecipeError, TrainSpec

if TYPE_CHECKING:  # torch-free at import: `mlan train`'s launcher resolves the budget before torchrun starts
    import torch


def resolve_budget(train: TrainSpec, manifest: dict[str, Any]) -> int:
    """`train.budget_tokens`, default the build's total sequence tokens; never more than the build holds.
    `manifest` is `read_manifest(build).data` (mlan.mixture.shards: the one reader, which validates totals)."""
    total = int(manifest["totals"]["tokens"])
    budget = train.budget_tokens or total
    if budget > total:
        raise RecipeError(f"train.budget_tokens = {budget}: the build holds only {total} sequence tokens "
                          "(one pass); raise mixture.budget and rebuild")
    return budget


def deal_budget(counts: torch.Tensor, remaining: int) -> torch.Tensor:
    """Share `remaining` tokens over a (world, micro) count table, micro-batch-major then rank order."""
    allot = counts.new_zeros(counts.shape)
    left = int(remaining)
    for j in range(counts.shape[1]):
        for r in range(counts.shape[0]):
            take = min(int(counts[r, j]), left)
            allot[r, j] = take
            left -= take
    return allot


def row_token_counts(batch: dict[str, Any], meta: dict[str, Any]) -> list[int]:
    """Real (unpadded, non-filler) tokens per row: the loader's `meta.row_tokens`, else an attention mask."""
    if "row_tokens" in meta:
        return [int(n) for n in meta["row_tokens"]]
    if "attention_mask" in batch:
        return [int(n) for n in batch["attention_mask"].sum(dim=1)]
    if batch["input_ids"].shape[0] == 1:
        return [int(meta["n_tokens"])]
    raise TrainError(f"batch {meta.get('keys')}: no meta.row_tokens; cannot cut it to the token budget")


def modality_counts(ids: torch.Tensor, position_ids: torch.Tensor, lengths: list[int], kept: list[int],
                    image_token_id: int) -> dict[str, int]:
    """Kept tokens by modality: a document (positions restart at 0) is image_text iff it holds an image token."""
    out = {"text": 0, "image_text": 0}
    for row_ids, row_pos, n, k in zip(ids, position_ids.reshape(ids.shape), lengths, kept):
        starts = (row_pos[:n] == 0).nonzero().flatten().tolist()
        if not starts or starts[0] != 0:
            starts = [0] + starts
        for a, e in zip(starts, starts[1:] + [n]):
            has_image = bool((row_ids[a:e] == image_token_id).any())
            out["image_text" if has_image else "text"] += max(0, min(e, k) - a)
    return out


def truncate_batch(batch: dict[str, Any], meta: dict[str, Any], keep_tokens: int,
                   image_token_id: int) -> dict[str, Any]:
    """Keep the first `keep_tokens` real tokens (row by row); later positions get no loss. Returns new meta."""
    lengths = row_token_counts(batch, meta)
    labels = batch["labels"].clone()
    kept, left = [], keep_tokens
    for i, n in enumerate(lengths):
        k = min(n, left)
        labels[i, k:] = IGNORE_INDEX
        kept.append(k)
        left -= k
    batch["labels"] = labels
    by_mod = modality_counts(batch["input_ids"], batch["position_ids"], lengths, kept, image_token_id)
    return {**meta, "n_tokens": keep_tokens, "tokens_by_modality": by_mod}
