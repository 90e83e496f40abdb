"""Losses against torch's own cross_entropy (the independent reference), on a vocabulary with padded rows."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mlan.train.losses import IGNORE_INDEX, count_loss_tokens, shift_labels, target_loss_sum

N_REAL, N_ROWS = 50, 58  # 8 padded rows, like Mllama's extra embedding rows


def _batch(seed: int = 0, b: int = 2, length: int = 12):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, length, N_ROWS, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, N_REAL, (b, length), generator=g)
    labels[:, :3] = IGNORE_INDEX  # a prompt
    labels[1, -2:] = IGNORE_INDEX  # an image token / padding
    return logits, labels


def _reference(logits, labels, eps: float) -> torch.Tensor:
    """torch's label-smoothed CE over the real vocabulary, after the causal shift."""
    z = logits[:, :-1, :N_REAL].reshape(-1, N_REAL)
    y = labels[:, 1:].reshape(-1)
    return F.cross_entropy(z, y, ignore_index=IGNORE_INDEX, reduction="sum", label_smoothing=eps)


def test_cross_entropy_equals_torch_over_real_vocab():
    logits, labels = _batch()
    ours = target_loss_sum(logits, shift_labels(labels), N_REAL)
    assert torch.allclose(ours.double(), _reference(logits, labels, 0.0), rtol=1e-6)


@pytest.mark.parametrize("alpha", [0.0, 0.01, 0.3])
def test_soft_targets_equal_label_smoothing_rescaled(alpha):
    logits, labels = _batch(1)
    ours = target_loss_sum(logits, shift_labels(labels), N_REAL, soft_targets=alpha)
    eps = alpha * N_REAL / (N_REAL - 1)
    assert torch.allclose(ours.double(), _reference(logits, labels, eps), rtol=1e-6)
    if alpha == 0.0:
        assert torch.equal(ours, target_loss_sum(logits, shift_labels(labels), N_REAL))


def test_soft_targets_give_padded_rows_no_mass_or_gradient():
    logits, labels = _batch(2)
    logits = logits.float().requires_grad_(True)
    target_loss_sum(logits, shift_labels(labels), N_REAL, soft_targets=0.01).backward()
    assert logits.grad[..., N_REAL:].abs().max() == 0
    assert logits.grad[..., :N_REAL].abs().max() > 0
    # including the padded rows would change the loss: the slice matters
    assert not torch.allclose(target_loss_sum(logits, shift_labels(labels), N_ROWS, soft_targets=0.01),
                              target_loss_sum(logits, shift_labels(labels), N_REAL, soft_targets=0.01))


def test_soft_targets_match_explicit_target_distribution():
    """The paper's definition, built explicitly on a small vocabulary: 1−α on y, α/(N−1) elsewhere."""
    logits, labels = _batch(3)
    alpha = 0.05
    z = logits[:, :-1, :N_REAL].reshape(-1, N_REAL)
    y = labels[:, 1:].reshape(-1)
    keep = y != IGNORE_INDEX
    target = torch.full((int(keep.sum()), N_REAL), alpha / (N_REAL - 1), dtype=torch.float64)
    target[torch.arange(target.shape[0]), y[keep]] = 1 - alpha
    explicit = -(target * torch.log_softmax(z[keep], -1)).sum()
    assert torch.allclose(target_loss_sum(logits, shift_labels(labels), N_REAL, 0.05).double(), explicit, rtol=1e-6)


def test_label_outside_real_vocab_is_an_error():
    logits, labels = _batch()
    labels[0, 5] = N_REAL + 1
    with pytest.raises(ValueError, match="outside the real vocabulary"):
        target_loss_sum(logits, shift_labels(labels), N_REAL)


def test_loss_token_count_follows_the_shift():
    labels = torch.tensor([[IGNORE_INDEX, 5, 6, IGNORE_INDEX], [1, 2, IGNORE_INDEX, IGNORE_INDEX]])
    assert shift_labels(labels).tolist() == [[5, 6, IGNORE_INDEX, IGNORE_INDEX], [2, IGNORE_INDEX, IGNORE_INDEX,
                                                                                 IGNORE_INDEX]]
    assert count_loss_tokens(labels) == 3
