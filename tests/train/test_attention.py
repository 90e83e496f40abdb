"""`train.attention: documents` (mlan.train.attention): per-document causal SDPA equals transformers' `sdpa` with its
dense block-diagonal mask, in logits and gradients, on packed batches of tiny LLaVA and Mllama (images, GQA,
non-zero cross-attention gates); it builds no dense mask; other calls fall back to `sdpa`.

The packed-row loss == sum of per-document losses invariant runs under both choices in tests/data/test_isolation.py.
A control registers an attention that ignores document boundaries and shows the comparison catches it.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from shardkit import LLAVA_FC, MLLAMA_FC, make_doc, pack
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, create_causal_mask

from mlan.data.collate import family_collate
from mlan.families import modeling
from mlan.families.llava.model import compose as compose_llava
from mlan.families.mllama.patch import has_reference_cross_attention
from mlan.recipe import ModelSpec, Recipe, RecipeError, load_recipe
from mlan.train import attention
from mlan.train.attention import ATTENTION_CHOICES, set_attention
from mlan.train.model import prepare_model

TOL = 1e-5
FCS = {"llava": LLAVA_FC, "mllama": MLLAMA_FC}


def _build(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = modeling.build_model(ModelSpec(family=family), FCS[family]).eval()
    if family == "mllama":  # zero-initialised gates would make every cross-attention check vacuous
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
                    p.fill_(0.8)
    return model


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    return {family: _build(family) for family in FCS}


def packed_batch(family: str) -> dict:
    """Two packed rows: documents of different lengths, images in both rows, a padding tail on the shorter row."""
    rng = np.random.default_rng(11)
    n_img = LLAVA_FC["image_tokens"] if family == "llava" else 1
    rows = [
        pack([make_doc(rng, 30), make_doc(rng, 26, (8,), n_img, image_sizes=((80, 40),)), make_doc(rng, 9),
              make_doc(rng, 17)], "r0"),
        pack([make_doc(rng, 12, (3, 7), n_img, image_sizes=((40, 80), (64, 64))), make_doc(rng, 21)], "r1"),
    ]
    batch = family_collate(FCS[family])(rows)
    batch.pop("meta")
    assert batch["input_ids"].shape[0] == 2 and len(rows[1]) < batch["input_ids"].shape[1]  # a padding tail
    assert int((batch["position_ids"] == 0).sum()) == 4 + 2 + 1  # documents + the padding tail
    return batch


def forward(model, batch: dict, kind: str, **extra) -> torch.Tensor:
    set_attention(model, kind)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return model(**inputs, use_cache=False, **extra).logits


def summed_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=-100, reduction="sum")


# ---------------------------------------------------------------- equivalence with sdpa
@pytest.mark.parametrize("family", ["llava", "mllama"])
def test_documents_logits_equal_sdpa_on_packed_rows(models, family):
    model = models[family]
    text = model.config.get_text_config()
    assert text.num_key_value_heads < text.num_attention_heads  # GQA is exercised
    batch = packed_batch(family)
    with torch.no_grad():
        docs = forward(model, batch, "documents")
        dense = forward(model, batch, "sdpa")
    assert (docs - dense).abs().max() < TOL


@pytest.mark.parametrize("family", ["llava", "mllama"])
def test_documents_gradients_equal_sdpa(models, family):
    model = models[family]
    batch = packed_batch(family)
    grads = {}
    for kind in ATTENTION_CHOICES:
        model.zero_grad(set_to_none=True)
        summed_loss(forward(model, batch, kind), batch["labels"]).backward()
        grads[kind] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    assert grads["documents"].keys() == grads["sdpa"].keys()
    assert any("self_attn.q_proj" in n for n in grads["sdpa"])
    if family == "mllama":
        assert any("cross_attn.k_proj" in n for n in grads["sdpa"])
    for name, g in grads["sdpa"].items():
        torch.testing.assert_close(grads["documents"][name], g, atol=TOL, rtol=1e-4, msg=name)


def _row_causal(module, query, key, value, attention_mask, **kwargs):
    """Control: causal attention over the whole row, as if the row were one document."""
    kwargs["position_ids"] = torch.arange(query.shape[2]).expand(query.shape[0], -1)
    return attention.documents_attention_forward(module, query, key, value, attention_mask, **kwargs)


@pytest.mark.parametrize("family", ["llava", "mllama"])
def test_control_attention_across_documents_is_caught(models, family):
    """The comparison above fails for an attention that ignores document boundaries (with the same no-mask
    mask function, so this also shows that "documents" gets no mask and draws the boundaries itself)."""
    model = models[family]
    batch = packed_batch(family)
    AttentionInterface.register("mlan_test_row_causal", _row_causal)
    AttentionMaskInterface.register("mlan_test_row_causal", attention.documents_mask)
    with torch.no_grad():
        dense = forward(model, batch, "sdpa")
        attention.language_model(model).set_attn_implementation("mlan_test_row_causal")
        leaky = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
    set_attention(model, "sdpa")
    assert (leaky - dense).abs().max() > 1e-3


# ---------------------------------------------------------------- masks and fallbacks
def test_no_dense_mask_for_packed_rows(models):
    lm = attention.language_model(models["llava"])
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5, 0, 1, 2, 3]])
    emb = torch.zeros(2, 10, lm.config.hidden_size)
    set_attention(models["llava"], "sdpa")
    dense = create_causal_mask(lm.config, emb, None, None, pos)
    assert dense.shape == (2, 1, 10, 10) and not bool(dense[0, 0, 3, 2])  # transformers' block-diagonal mask
    set_attention(models["llava"], "documents")
    assert create_causal_mask(lm.config, emb, None, None, pos) is None
    padding = torch.ones(2, 10, dtype=torch.long)
    padding[1, 8:] = 0
    with_padding = create_causal_mask(lm.config, emb, padding, None, pos)  # an explicit mask: sdpa's mask
    set_attention(models["llava"], "sdpa")
    assert torch.equal(with_padding, create_causal_mask(lm.config, emb, padding, None, pos))


def test_padding_mask_cache_and_decoding_fall_back_to_sdpa(models):
    model = models["llava"]
    ids = torch.randint(0, 1000, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    with torch.no_grad():
        out = {}
        for kind in ATTENTION_CHOICES:
            set_attention(model, kind)
            out[kind] = (model(input_ids=ids, attention_mask=mask, use_cache=False).logits,
                         model(input_ids=ids, use_cache=True).logits,
                         model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False))
    for a, b in zip(out["documents"], out["sdpa"]):
        assert a.shape == b.shape and (a.float() - b.float()).abs().max() < TOL


def test_mllama_cross_attention_keeps_sdpa_with_its_mask(models):
    model = models["mllama"]
    set_attention(model, "documents")
    assert has_reference_cross_attention(model)
    layer = next(m for m in model.modules() if type(m).__name__ == "MllamaTextCrossAttention")
    assert layer.config._attn_implementation == attention.DOCUMENTS_IMPLEMENTATION
    torch.manual_seed(3)
    q, k, v = torch.randn(2, 4, 7, 16), torch.randn(2, 2, 30, 16), torch.randn(2, 2, 30, 16)
    mask = torch.zeros(2, 1, 7, 30)
    mask[:, :, :3, 10:] = torch.finfo(torch.float32).min
    pos = torch.arange(7).expand(2, -1)
    for m in (mask, None):
        got, _ = attention.documents_attention_forward(layer, q, k, v, m, scaling=0.25, position_ids=pos)
        want, _ = sdpa_attention_forward(layer, q, k, v, m, scaling=0.25, position_ids=pos)
        assert torch.equal(got, want)
    set_attention(model, "sdpa")


def test_document_spans_and_their_cache():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3, 0], [3, 4, 0, 1, 2, 3, 4, 5, 6, 7]])
    assert attention.document_spans(pos, 2) == (((0, 3), (3, 5), (5, 9), (9, 10)), ((0, 2), (2, 10)))
    assert attention.document_spans(pos[:1], 2)[1] == ((0, 3), (3, 5), (5, 9), (9, 10))  # (1, L) broadcast
    cache = attention._SpanCache()
    first = cache.get(pos, 2)
    assert cache.get(pos, 2) is first  # once per forward, not once per layer
    pos[1, 5] = 0  # in place: the version counter changes, the spans are recomputed
    assert cache.get(pos, 2).spans[1] == ((0, 2), (2, 5), (5, 10))
    assert cache.get(pos.clone(), 2) is not first


# ---------------------------------------------------------------- switching, recipe, trainer
def test_set_attention_switches_the_language_model_only(models):
    for family, model in models.items():
        vision = getattr(model.model, "vision_tower", None) or model.model.vision_model
        set_attention(model, "documents")
        set_attention(model, "documents")  # idempotent
        assert attention.language_model(model).config._attn_implementation == "mlan_documents"
        assert vision.config._attn_implementation == "sdpa", family
        set_attention(model, "sdpa")
        assert attention.language_model(model).config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="expected one of 'documents', 'sdpa', got 'flash'"):
        set_attention(models["llava"], "flash")


def test_set_attention_on_composed_llava_and_lora(tmp_path):
    """A LLaVA composed from parts keeps the base LLM's own config object: the language model is set directly."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaForCausalLM

    from mlan.families.tiny import LLAMA3_VOCAB, tiny_llama_config
    from mlan.recipe import LoraSpec

    LlamaForCausalLM(tiny_llama_config(vocab_size=LLAMA3_VOCAB)).save_pretrained(tmp_path / "llm")
    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     image_size=56, patch_size=14)).save_pretrained(tmp_path / "clip")
    spec = ModelSpec(family="llava", llm=str(tmp_path / "llm"), vision_tower=str(tmp_path / "clip"), image_tokens=16)
    model = compose_llava(spec, LLAVA_FC)
    lm = attention.language_model(model)
    assert lm.config is not model.config.text_config
    set_attention(model, "documents")
    assert lm.config._attn_implementation == "mlan_documents"
    assert all(layer.self_attn.config._attn_implementation == "mlan_documents" for layer in lm.layers)
    freeze = modeling.freeze_policy("stage2", None)
    peft_model = modeling.apply_lora(model, LoraSpec(enabled=True), freeze)
    set_attention(peft_model, "sdpa")
    assert lm.config._attn_implementation == "sdpa"


def test_bad_attention_is_a_one_line_recipe_error(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"model": {"family": "llava"}}))
    assert load_recipe(path).train.attention == "documents"
    with pytest.raises(RecipeError) as info:
        load_recipe(path, ["train.attention=flash"])
    message = str(info.value)
    assert "\n" not in message and "train.attention" in message and "'flash'" in message
    assert "'documents' or 'sdpa'" in message


@pytest.mark.parametrize("kind", ATTENTION_CHOICES)
def test_trainer_applies_train_attention(kind):
    recipe = Recipe.model_validate({"model": {"family": "llava"}, "train": {"attention": kind}})
    model = prepare_model(recipe, LLAVA_FC)
    assert attention.language_model(model).config._attn_implementation == \
        {"documents": "mlan_documents", "sdpa": "sdpa"}[kind]
