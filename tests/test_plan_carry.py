"""The planner's rounding carry: each source's target absorbs the error so far, and image-text absorbs text's.

Without the carry every source rounds on its own and the errors add up; these cases are built so that they do.
"""
from __future__ import annotations

import numpy as np

from mlan.mixture.plan import SourceDocs, make_plan


def _flat(name: str, modality: str, n: int, length: int) -> SourceDocs:
    return SourceDocs(name=name, modality=modality, weight=1.0, upsample=True,
                      n_tokens=np.full(n, length, dtype=np.int64))


def test_source_carry_makes_an_example_budget_exact_over_many_sources():
    # 100 examples over 7 equal sources: 14.29 each; rounding each on its own gives 7 × 14 = 98
    sources = [_flat(f"t{i}", "text", 50, 100) for i in range(7)]
    plan = make_plan(sources, budget_examples=100, ratio_text=1.0, ratio_by="examples", seed=0)
    assert plan.doc.size == 100
    per_source = np.bincount(plan.source, minlength=7)
    assert per_source.max() - per_source.min() <= 1


def test_modality_carry_moves_text_rounding_into_image_text():
    # text target 7,600 in 1,000-token documents → 8,000 (400 over); image-text must then aim at 2,000, not 2,400
    sources = [_flat("text", "text", 20, 1000), _flat("img", "image_text", 20, 300)]
    plan = make_plan(sources, budget_tokens=10_000, ratio_text=0.76, ratio_by="tokens", seed=0)
    text = int(plan.n_tokens[plan.source == 0].sum())
    assert text == 8000
    assert abs(plan.tokens - 10_000) <= 300 // 2  # within half an image-text document of the budget
