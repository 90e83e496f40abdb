"""Invariant 3 (isolation): a packed row's summed loss equals the sum of its documents' losses run alone.

The reference runs each document by itself with transformers' own preprocessing: its tokens, its images
through the family's image processor, no position_ids (the model's default 0..n-1) and, for Mllama, the
cross-attention mask made by transformers' processor helpers for that one document. The packed side goes
through `mlan.data.collate`, under both `train.attention` choices (transformers' `sdpa` with its block-diagonal
mask, and mlan's per-document attention, `mlan.train.attention`). Negative controls show the test can fail: the
Hugging Face row-level mask, the unpatched transformers cross-attention layer, and the default KV cache each break
isolation.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from shardkit import LLAVA_FC, MLLAMA_FC, Doc, make_doc, pack
from transformers import LlavaForConditionalGeneration, MllamaForConditionalGeneration
from transformers.models.mllama.processing_mllama import (
    convert_sparse_cross_attention_mask_to_dense,
    get_cross_attention_token_mask,
)

from mlan.data.collate import family_collate
from mlan.data.images import decode_image
from mlan.families import tiny
from mlan.families.llava.inputs import llava_pixel_values
from mlan.families.mllama.inputs import mllama_images
from mlan.families.mllama.patch import apply_reference_cross_attention, has_reference_cross_attention
from mlan.train.attention import ATTENTION_CHOICES, set_attention

TOL = 1e-5


def summed_loss(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Next-token cross-entropy summed over labelled positions, fp32 (the model's own shift)."""
    return float(F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                 ignore_index=-100, reduction="sum"))


def alone_labels(doc: Doc) -> torch.Tensor:
    lab = torch.tensor(doc.ids.astype(np.int64))
    lab[torch.tensor(doc.loss == 0)] = -100
    lab[lab == tiny.IMAGE_TOKEN_ID] = -100
    return lab[None]


@torch.no_grad()
def llava_alone(model, doc: Doc) -> float:
    kw = {"input_ids": torch.tensor(doc.ids.astype(np.int64))[None]}
    if doc.images:
        kw["pixel_values"] = llava_pixel_values([decode_image(b, "t") for b in doc.images], LLAVA_FC["image_size"])
    return summed_loss(model(**kw, use_cache=False).logits, alone_labels(doc))


@torch.no_grad()
def mllama_alone(model, doc: Doc) -> float:
    ids = doc.ids.astype(np.int64)
    kw = {"input_ids": torch.tensor(ids)[None]}
    if doc.images:
        proc = mllama_images([decode_image(b, "t") for b in doc.images], tiny.TINY_MLLAMA_TILE, tiny.TINY_MLLAMA_MAX_TILES)
        tok_mask = get_cross_attention_token_mask(ids.tolist(), tiny.IMAGE_TOKEN_ID)
        dense = convert_sparse_cross_attention_mask_to_dense([tok_mask], [proc.num_tiles],
                                                              tiny.TINY_MLLAMA_MAX_TILES, len(ids))
        kw.update(pixel_values=proc.pixel_values[None], aspect_ratio_ids=proc.aspect_ratio_ids[None],
                  aspect_ratio_mask=proc.aspect_ratio_mask[None], cross_attention_mask=torch.from_numpy(dense))
    return summed_loss(model(**kw, use_cache=False).logits, alone_labels(doc))


@torch.no_grad()
def packed_loss(model, docs: list[Doc], fc: dict, use_cache: bool | None = False, hf_row_mask: bool = False) -> float:
    row = pack(docs, "row")
    batch = family_collate(fc)([row])
    meta = batch.pop("meta")
    assert meta["n_tokens"] == len(row)
    if hf_row_mask:  # transformers' processor mask over the whole row: the last image is visible to the row's end
        tok_mask = get_cross_attention_token_mask(row.ids.astype(np.int64).tolist(), tiny.IMAGE_TOKEN_ID)
        tiles = mllama_images([decode_image(b, "t") for b in row.images], tiny.TINY_MLLAMA_TILE,
                              tiny.TINY_MLLAMA_MAX_TILES).num_tiles
        batch["cross_attention_mask"] = torch.from_numpy(convert_sparse_cross_attention_mask_to_dense(
            [tok_mask], [tiles], tiny.TINY_MLLAMA_MAX_TILES, len(row)))
    kwargs = {} if use_cache is None else {"use_cache": use_cache}
    labels = batch.pop("labels")
    assert int((labels != -100).sum()) == meta["n_loss_tokens"]
    return summed_loss(model(**batch, **kwargs).logits, labels)


def rel_gap(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def _cases(image_tokens: int) -> dict[str, list[Doc]]:
    rng = np.random.default_rng(7)
    return {
        "text_only": [make_doc(rng, 30), make_doc(rng, 25), make_doc(rng, 20)],
        "one_image": [make_doc(rng, 24), make_doc(rng, 30, (10,), image_tokens, image_sizes=((80, 40),)),
                      make_doc(rng, 18)],
        "two_image_docs": [make_doc(rng, 26, (5,), image_tokens, image_sizes=((40, 80),)),
                           make_doc(rng, 22, (8, 9), image_tokens, image_sizes=((64, 64), (120, 40))),
                           make_doc(rng, 14)],
    }


@pytest.fixture(scope="module")
def llava():
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(tiny.tiny_llava_config()).eval()


@pytest.fixture(scope="module")
def mllama():
    torch.manual_seed(0)
    model = MllamaForConditionalGeneration(tiny.tiny_mllama_config()).eval()
    with torch.no_grad():  # zero-initialised gates would make every cross-attention check vacuous
        for name, p in model.named_parameters():
            if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
                p.fill_(0.8)
    return model


@pytest.mark.parametrize("attention", ATTENTION_CHOICES)
@pytest.mark.parametrize("case", ["text_only", "one_image", "two_image_docs"])
def test_llava_packed_loss_equals_documents_alone(llava, case, attention):
    set_attention(llava, attention)
    docs = _cases(LLAVA_FC["image_tokens"])[case]
    alone = sum(llava_alone(llava, d) for d in docs)
    packed = packed_loss(llava, docs, LLAVA_FC)
    assert rel_gap(packed, alone) < TOL, (packed, alone)


@pytest.mark.parametrize("attention", ATTENTION_CHOICES)
@pytest.mark.parametrize("case", ["text_only", "one_image", "two_image_docs"])
def test_mllama_packed_loss_equals_documents_alone(mllama, case, attention):
    apply_reference_cross_attention(mllama)
    set_attention(mllama, attention)
    docs = _cases(1)[case]
    alone = sum(mllama_alone(mllama, d) for d in docs)
    packed = packed_loss(mllama, docs, MLLAMA_FC)
    assert rel_gap(packed, alone) < TOL, (packed, alone)


def test_mllama_isolation_fails_with_hf_row_mask(mllama):
    """Control: transformers' processor mask lets one document's image reach the next document."""
    apply_reference_cross_attention(mllama)
    docs = _cases(1)["two_image_docs"]
    alone = sum(mllama_alone(mllama, d) for d in docs)
    assert rel_gap(packed_loss(mllama, docs, MLLAMA_FC, hf_row_mask=True), alone) > TOL


def test_mllama_isolation_fails_without_reference_cross_attention():
    """Control: stock transformers cross-attention lets rows that see no image read every image of the row."""
    torch.manual_seed(0)
    stock = MllamaForConditionalGeneration(tiny.tiny_mllama_config()).eval()
    with torch.no_grad():
        for name, p in stock.named_parameters():
            if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
                p.fill_(0.8)
    assert not has_reference_cross_attention(stock)
    for case in ("one_image", "two_image_docs"):
        docs = _cases(1)[case]
        alone = sum(mllama_alone(stock, d) for d in docs)
        assert rel_gap(packed_loss(stock, docs, MLLAMA_FC), alone) > TOL, case
    apply_reference_cross_attention(stock)
    assert has_reference_cross_attention(stock)
    docs = _cases(1)["two_image_docs"]
    assert rel_gap(packed_loss(stock, docs, MLLAMA_FC), sum(mllama_alone(stock, d) for d in docs)) < TOL


def test_packed_self_attention_needs_use_cache_false(mllama):
    """Control: with the default `use_cache=True`, transformers ignores position_ids for masking."""
    docs = _cases(1)["text_only"]
    alone = sum(mllama_alone(mllama, d) for d in docs)
    assert rel_gap(packed_loss(mllama, docs, MLLAMA_FC, use_cache=None), alone) > TOL


def test_reference_patch_is_idempotent_and_identity_on_masked_rows(mllama):
    """A fully masked dummy image leaves a text-only row's logits bit-identical to skipping cross-attention."""
    apply_reference_cross_attention(mllama)
    apply_reference_cross_attention(mllama)
    rng = np.random.default_rng(3)
    doc = make_doc(rng, 20)
    batch = family_collate(MLLAMA_FC)([pack([doc], "r")])
    batch.pop("meta"); batch.pop("labels")
    assert batch["cross_attention_mask"].sum() == 0 and "pixel_values" in batch
    with torch.no_grad():
        with_dummy = mllama(**batch, use_cache=False).logits
        skipped = mllama(input_ids=batch["input_ids"], use_cache=False).logits
    assert torch.equal(with_dummy, skipped)
