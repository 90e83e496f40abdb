"""`documents` attention on CUDA: one `varlen_attn` call per layer over the flattened documents of a batch.

CPU (everywhere): `cu_seqlens` against a loop over every row's positions; flatten/unflatten against indexing;
`attend_varlen`'s plumbing (flatten, cu_seqlens, GQA, unflatten) run with an independent per-segment reference of
varlen_attn's contract equals the per-document SDPA path in outputs and gradients; the cache builds `cu_seqlens`
once per batch. GPU (`gpu` marker, skipped without CUDA): logits and gradients of tiny LLaVA and Mllama packed rows
in bf16 (and fp32 weights under bf16 autocast) under the varlen kernel against the per-document SDPA loop, both
measured against an fp32 reference.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from shardkit import LLAVA_FC, MLLAMA_FC, make_doc, pack
from torch.utils.flop_counter import FlopCounterMode

from mlan.data.collate import family_collate
from mlan.families import modeling
from mlan.recipe import ModelSpec
from mlan.train import attention
from mlan.train.attention import (
    Segments,
    attend_varlen,
    cu_seqlens,
    document_spans,
    flatten_rows,
    set_attention,
    unflatten_rows,
    varlen_supported,
)

CUDA = torch.cuda.is_available()
FCS = {"llava": LLAVA_FC, "mllama": MLLAMA_FC}


def random_positions(rng: np.random.Generator, batch: int, length: int) -> torch.Tensor:
    """Rows of documents of random lengths, positions restarting at 0; some rows start mid-document (≠ 0)."""
    rows = []
    for r in range(batch):
        pos, first = [], r % 2 == 1
        while len(pos) < length:
            n = int(rng.integers(1, 20))
            start = int(rng.integers(1, 5)) if first else 0
            pos += list(range(start, start + n))
            first = False
        rows.append(pos[:length])
    return torch.tensor(rows)


def reference_cu(position_ids: torch.Tensor) -> tuple[list[int], int]:
    """A document starts at column 0 and wherever the position is 0; rows are laid out one after another."""
    batch, length = position_ids.shape
    starts = [r * length + i for r in range(batch) for i in range(length) if i == 0 or int(position_ids[r, i]) == 0]
    bounds = starts + [batch * length]
    return bounds, max(b - a for a, b in itertools.pairwise(bounds))


@pytest.mark.parametrize("seed", range(5))
def test_cu_seqlens_against_a_loop_over_positions(seed):
    rng = np.random.default_rng(seed)
    pos = random_positions(rng, batch=int(rng.integers(1, 5)), length=int(rng.integers(5, 90)))
    cu, longest = cu_seqlens(document_spans(pos, pos.shape[0]), pos.shape[1])
    want, want_longest = reference_cu(pos)
    assert cu.dtype == torch.int32 and cu.tolist() == want and longest == want_longest


def test_cu_seqlens_broadcasts_one_row_of_positions():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0]])
    cu, longest = cu_seqlens(document_spans(pos, 3), 6)
    assert cu.tolist() == [0, 3, 5, 6, 9, 11, 12, 15, 17, 18] and longest == 3


def test_flatten_and_unflatten_rows():
    b, h, length, d = 3, 4, 7, 5
    t = torch.randn(b, length, h, d).transpose(1, 2)  # (B, H, L, D) as transformers' projections make it
    flat = flatten_rows(t)
    assert flat.shape == (b * length, h, d) and flat.data_ptr() == t.data_ptr()  # a view, no copy
    for r in range(b):
        for i in range(length):
            assert torch.equal(flat[r * length + i], t[r, :, i])
    back = unflatten_rows(flat, b)  # (B, L, H, D): transformers' attention output layout
    assert torch.equal(back, t.transpose(1, 2))
    assert torch.equal(flatten_rows(back.transpose(1, 2)), flat)  # round trip


def reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
    """varlen_attn's contract, one segment at a time: causal softmax attention within [cu[i], cu[i+1])."""
    assert window_size == (-1, 0) and torch.equal(cu_q, cu_k) and max_q == max_k
    bounds = cu_q.tolist()
    assert max(b - a for a, b in itertools.pairwise(bounds)) == max_q
    group = q.shape[1] // k.shape[1]
    assert enable_gqa == (group > 1)
    out = []
    for a, e in itertools.pairwise(bounds):
        qs, ks, vs = q[a:e].transpose(0, 1), k[a:e].transpose(0, 1), v[a:e].transpose(0, 1)  # (H, n, D)
        ks, vs = ks.repeat_interleave(group, 0), vs.repeat_interleave(group, 0)
        scores = qs @ ks.transpose(1, 2) * (scale if scale is not None else q.shape[-1] ** -0.5)
        n = e - a
        scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
        out.append((scores.softmax(-1) @ vs).transpose(0, 1))
    return torch.cat(out)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_attend_varlen_plumbing_equals_per_document_sdpa(kv_heads):
    rng = np.random.default_rng(kv_heads)
    pos = random_positions(rng, batch=3, length=40)
    torch.manual_seed(0)
    shapes = {"q": (3, 40, 4, 8), "k": (3, 40, kv_heads, 8), "v": (3, 40, kv_heads, 8)}
    leaves = {n: torch.randn(s, dtype=torch.float64, requires_grad=True) for n, s in shapes.items()}
    q, k, v = (leaves[n].transpose(1, 2) for n in "qkv")  # (B, H, L, D)
    segments = Segments(document_spans(pos, 3), 40)
    got = attend_varlen(q, k, v, segments, 0.3, kernel=reference_varlen)
    want = attention._attend_documents(q, k, v, pos, 0.0, 0.3)  # CPU: the per-document SDPA loop
    assert got.shape == want.shape == (3, 40, 4, 8)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(got)
    grads_got = torch.autograd.grad(got, list(leaves.values()), g)
    grads_want = torch.autograd.grad(want, list(leaves.values()), g)
    for a, b in zip(grads_got, grads_want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def varlen_torch_2_11(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1)):
    """torch 2.11's varlen_attn signature (the GPU image's torch): no `enable_gqa` keyword, which came in 2.12."""
    assert k.shape[1] == v.shape[1] == q.shape[1]  # without the keyword, K/V come with the query's heads
    return reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale, window_size=window_size)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_attend_varlen_runs_on_a_kernel_without_enable_gqa(kv_heads):
    pos = random_positions(np.random.default_rng(7), batch=2, length=24)
    torch.manual_seed(1)
    q = torch.randn(2, 4, 24, 8, dtype=torch.float64)
    k, v = (torch.randn(2, kv_heads, 24, 8, dtype=torch.float64) for _ in "kv")
    got = attend_varlen(q, k, v, Segments(document_spans(pos, 2), 24), 0.3, kernel=varlen_torch_2_11)
    want = attention._attend_documents(q, k, v, pos, 0.0, 0.3)  # CPU: the per-document SDPA loop
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_cu_seqlens_built_once_per_batch():
    pos = torch.tensor([[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]])
    cache = attention._SpanCache()
    seg = cache.get(pos, 2)
    cu, longest = seg.cu_seqlens(torch.device("cpu"))
    again = cache.get(pos, 2).cu_seqlens(torch.device("cpu"))
    assert again[0] is cu and again[1] == longest == 3  # every layer of the forward reuses it
    assert cache.get(pos.clone(), 2).cu_seqlens(torch.device("cpu"))[0] is not cu  # the next batch: rebuilt
    assert cu.tolist() == [0, 3, 5, 7, 10]


@pytest.mark.skipif(CUDA, reason="checks the CPU dispatch")
def test_the_real_varlen_attn_takes_our_call_down_to_its_cuda_kernel():
    """torch's own varlen_attn accepts attend_varlen's arguments (names, GQA, window) and reaches the flash kernel,
    which exists on CUDA only: the call shape is right even where the kernel cannot run."""
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 0]])
    q, k = torch.randn(1, 4, 8, 16, dtype=torch.bfloat16), torch.randn(1, 2, 8, 16, dtype=torch.bfloat16)
    with pytest.raises(NotImplementedError, match="_flash_attention_forward.*CPU"):
        attend_varlen(q, k, k, Segments(document_spans(pos, 1), 8), 0.25)


def test_varlen_not_chosen_on_cpu_and_the_reference_is_a_model_setting():
    """The per-document SDPA reference is chosen per model (its own registered name), never by process state."""
    q = torch.randn(1, 4, 8, 16, dtype=torch.bfloat16)
    assert not varlen_supported(q, q, q, 0.0)  # CPU: the per-document SDPA loop stays the path
    assert attention.register(varlen=False) == attention.PER_DOCUMENT_IMPLEMENTATION
    assert attention.register() == attention.DOCUMENTS_IMPLEMENTATION
    reference = attention.AttentionInterface._global_mapping[attention.PER_DOCUMENT_IMPLEMENTATION]
    assert reference.keywords == {"varlen": False}
    assert not hasattr(attention, "_VARLEN")


# ---------------------------------------------------------------- GPU: the two paths on tiny models
def packed_batch(family: str) -> dict:
    """Two packed rows with images, GQA, several documents and a padding tail (as tests/train/test_attention.py)."""
    rng = np.random.default_rng(11)
    n_img = LLAVA_FC["image_tokens"] if family == "llava" else 1
    rows = [
        pack([make_doc(rng, 30), make_doc(rng, 26, (8,), n_img, image_sizes=((80, 40),)), make_doc(rng, 9),
              make_doc(rng, 17)], "r0"),
        pack([make_doc(rng, 12, (3, 7), n_img, image_sizes=((40, 80), (64, 64))), make_doc(rng, 21)], "r1"),
    ]
    batch = family_collate(FCS[family])(rows)
    batch.pop("meta")
    return batch


def logits_and_grads(model, batch: dict, dtype: torch.dtype) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    inputs = {k: (v.to("cuda", dtype) if v.is_floating_point() else v.to("cuda")) for k, v in batch.items()
              if k != "labels"}
    logits = model(**inputs, use_cache=False).logits
    labels = batch["labels"].to("cuda")
    loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=-100)
    loss.backward()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters()
             if p.grad is not None and "language_model" in n and "self_attn" in n}
    return logits.detach().float(), grads


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA (varlen_attn runs on CUDA only)")
@pytest.mark.parametrize("family", ["llava", "mllama"])
def test_varlen_matches_per_document_sdpa_in_bf16(family):
    torch.manual_seed(0)
    model = modeling.build_model(ModelSpec(family=family), FCS[family]).eval()
    if family == "mllama":  # zero-initialised gates would hide the cross-attention layers
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
                    p.fill_(0.8)
    set_attention(model, "documents")
    text = model.config.get_text_config()
    assert text.num_key_value_heads < text.num_attention_heads  # GQA
    batch = packed_batch(family)
    ref_logits, ref_grads = logits_and_grads(model.to("cuda", torch.float32), batch, torch.float32)  # fp32 loop
    with torch.autocast("cuda", dtype=torch.bfloat16), FlopCounterMode(display=False) as counter:
        amp_logits, _ = logits_and_grads(model, batch, torch.float32)  # fp32 weights, bf16 autocast
    assert any("_varlen_attn" in str(op) for op in counter.get_flop_counts()["Global"])
    assert rel_err(amp_logits, ref_logits) < 5e-2
    model.to(torch.bfloat16)
    with FlopCounterMode(display=False) as counter:
        var_logits, var_grads = logits_and_grads(model, batch, torch.bfloat16)
    ops = {str(op) for op in counter.get_flop_counts()["Global"]}
    assert any("_varlen_attn" in op for op in ops), ops  # the varlen kernel ran
    set_attention(model, "documents", varlen=False)
    with FlopCounterMode(display=False) as counter:
        loop_logits, loop_grads = logits_and_grads(model, batch, torch.bfloat16)
    assert not any("_varlen_attn" in op for op in {str(op) for op in counter.get_flop_counts()["Global"]})
    # both bf16 paths are as close to the fp32 reference as each other (bf16 rounding, not a wrong mask)
    err_var, err_loop = rel_err(var_logits, ref_logits), rel_err(loop_logits, ref_logits)
    assert err_var < 2 * err_loop + 1e-3 and err_var < 5e-2, (err_var, err_loop)
    assert rel_err(var_logits, loop_logits) < 5e-2
    assert set(var_grads) == set(loop_grads) == set(ref_grads) and var_grads
    for name in ref_grads:
        e_var, e_loop = rel_err(var_grads[name], ref_grads[name]), rel_err(loop_grads[name], ref_grads[name])
        assert e_var < 2 * e_loop + 2e-2, (name, e_var, e_loop)
