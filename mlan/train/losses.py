"""Token losses over packed rows: cross-entropy and Soft Targets, summed so the trainer can normalize globally.

Both return the *sum* over loss tokens (labels != IGNORE_INDEX) of a micro-batch; the trainer divides by the
all-reduced loss-token count of the whole step, so neither grad accumulation nor world size changes the loss.
Only the real vocabulary takes part: logits beyond `real_vocab` (an added image-token row, Mllama's padded
embedding rows) are sliced off, so they get no probability mass and no gradient.
"""
from __future__ import annotations

import torch

from mlan.data.labels import IGNORE_INDEX

__all__ = ["IGNORE_INDEX", "count_loss_tokens", "shift_labels", "target_loss_sum"]


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Labels aligned with input_ids (transformers' convention) → targets for each position's next token."""
    return torch.nn.functional.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX)


def target_loss_sum(logits: torch.Tensor, targets: torch.Tensor, real_vocab: int,
                    soft_targets: float = 0.0) -> torch.Tensor:
    """Summed loss of logits (…, V) against next-token `targets` (same leading shape, −100 = ignored).

    Soft Targets (Srivastava et al.): the target token gets 1 − α, every other real-vocabulary token
    α/(N−1). With nll_v = −log p_v:  loss = (1 − α)·nll_y + α/(N−1)·Σ_{v≠y} nll_v
                                       = (1 − α − α/(N−1))·nll_y + α/(N−1)·Σ_v nll_v,
    and Σ_v nll_v = N·logsumexp(z) − Σ_v z_v over the real slice: no N-sized target tensor is ever built.
    That equals torch's label_smoothing ε = α·N/(N−1) over the same N classes.
    """
    targets = targets.reshape(-1)
    z = logits.reshape(-1, logits.shape[-1])
    keep = targets != IGNORE_INDEX
    if not bool(keep.all()):
        z, targets = z[keep], targets[keep]
    z = z[:, :real_vocab].float()
    if targets.numel() and int(targets.max()) >= real_vocab:
        raise ValueError(f"label id {int(targets.max())} is outside the real vocabulary (N = {real_vocab})")
    lse = torch.logsumexp(z, dim=-1)
    nll_y = lse - z.gather(1, targets[:, None]).squeeze(1)
    if not soft_targets:
        return nll_y.sum()
    alpha, n = float(soft_targets), real_vocab
    sum_nll = n * lse - z.sum(dim=-1)
    return ((1.0 - alpha - alpha / (n - 1)) * nll_y + (alpha / (n - 1)) * sum_nll).sum()


def count_loss_tokens(labels: torch.Tensor) -> int:
    """Loss tokens of a batch after the shift: positions whose next-token target is not ignored."""
    return int((shift_labels(labels) != IGNORE_INDEX).sum())
