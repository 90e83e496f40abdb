"""Per-document ("varlen") causal self-attention for packed rows: cost Σ nᵢ² per row instead of L².

A packed row (`mlan.data.collate`) holds several documents, each with `position_ids` restarting at 0 (the
padding tail is a document of its own), and no `attention_mask`. Under transformers' `sdpa`,
`create_causal_mask` turns such `position_ids` into a dense (B, 1, L, L) block-diagonal mask, and SDPA then
computes every score of the row, the cross-document blocks it masks away included (and an explicit mask keeps
SDPA off its flash kernel on GPU). `set_attention(model, "documents")` registers, as a transformers attention
implementation, an attention function that runs SDPA with `is_causal=True` on each document's own slice, and
a mask function that builds no mask in that case; then it switches the language model's self-attention to it.
Everything else (Mllama's cross-attention, an explicit mask, decoding, a KV cache) goes to transformers'
`sdpa_attention_forward` unchanged, with the mask transformers' `sdpa_mask` builds; `use_cache=True` counts as a
KV cache (the trainer passes `use_cache=False`).

A document starts where `position_ids` is 0 (mlan's rules). transformers' dense mask starts one wherever positions
do not go up by 1; for mlan's rows the two agree, for positions that jump without restarting at 0 they do not.

On CUDA (bf16/fp16 activations, head_dim a multiple of 8 up to 256, no dropout) the documents of all rows go to one
`torch.nn.attention.varlen.varlen_attn` call per layer instead of one SDPA call per document: q/k/v are flattened
to (B·L, heads, dim), `cu_seqlens` marks every document start (row r's starts offset by r·L), the kernel is causal
(`window_size=(-1, 0)`) and takes GQA's fewer KV heads directly. The per-document SDPA loop stays the path on CPU
and the reference (`set_attention(model, "documents", varlen=False)` forces it anywhere, for tests and benchmarks).

Segment boundaries cost one device→host copy of `position_ids` per forward (and one host→device copy of
`cu_seqlens` on CUDA): every layer receives the same `position_ids` tensor, so both are cached on that tensor (its
identity and in-place version counter). `create_causal_mask` itself still runs transformers'
`find_packed_sequence_indices`, which syncs once more.
"""
from __future__ import annotations

import functools
import inspect
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.attention.varlen import varlen_attn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward, use_gqa_in_sdpa
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, sdpa_mask

ATTENTION_CHOICES = ("documents", "sdpa")
DOCUMENTS_IMPLEMENTATION = "mlan_documents"  # the name registered with transformers
PER_DOCUMENT_IMPLEMENTATION = "mlan_documents_sdpa"  # the same, never `varlen_attn`: the reference path

Spans = tuple[tuple[tuple[int, int], ...], ...]  # per row: [start, end) of each document


# ---------------------------------------------------------------- segment boundaries
@dataclass
class Segments:
    """The documents of one batch: per-row spans on the host; `cu_seqlens` per device, built on first use."""

    spans: Spans
    length: int  # L, the row length
    _cu: dict[torch.device, tuple[torch.Tensor, int]] = field(default_factory=dict)

    def cu_seqlens(self, device: torch.device) -> tuple[torch.Tensor, int]:
        """(cumulative document starts over the flattened (B·L) rows, int32 on `device`; the longest document)."""
        if device not in self._cu:
            self._cu[device] = cu_seqlens(self.spans, self.length, device)
        return self._cu[device]


class _SpanCache:
    """The segments of the last `position_ids` tensor seen; one entry is enough (layers run one after another,
    and activation-checkpoint recomputation reuses the same tensor)."""

    def __init__(self) -> None:
        self._ref: weakref.ref | None = None
        self._key: tuple[Any, ...] = ()
        self._segments: Segments | None = None

    def get(self, position_ids: torch.Tensor, batch: int) -> Segments:
        key = (_version(position_ids), tuple(position_ids.shape), batch)
        if (self._segments is not None and self._ref is not None and self._ref() is position_ids
                and key == self._key and key[0] is not None):
            return self._segments
        segments = Segments(document_spans(position_ids, batch), int(position_ids.shape[-1]))
        self._ref, self._key, self._segments = weakref.ref(position_ids), key, segments
        return segments


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter: do not cache
        return None


def document_spans(position_ids: torch.Tensor, batch: int) -> Spans:
    """[start, end) of every document of every row: a document starts where `position_ids` is 0 (and at 0).

    One device→host copy. `position_ids` is (B, L) or (1, L) broadcast over the batch.
    """
    host = position_ids.detach().to("cpu").numpy()
    if host.shape[0] != batch:
        host = host.repeat(batch, axis=0)
    length = host.shape[1]
    rows = []
    for row in host:
        starts = (row == 0).nonzero()[0].tolist()
        if not starts or starts[0] != 0:
            starts.insert(0, 0)
        rows.append(tuple(zip(starts, starts[1:] + [length])))
    return tuple(rows)


def cu_seqlens(spans: Spans, length: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, int]:
    """varlen's `cu_seqlens` for rows flattened one after another: row r's document starts shifted by r·L, then
    B·L; and the longest document (varlen's `max_q` / `max_k`)."""
    starts = [r * length + s for r, row in enumerate(spans) for s, _ in row]
    longest = max((e - s for row in spans for s, e in row), default=0)
    cu = torch.tensor(starts + [len(spans) * length], dtype=torch.int32)
    return cu.to(device), longest


def flatten_rows(t: torch.Tensor) -> torch.Tensor:
    """(B, H, L, D) as transformers hands q/k/v to attention → (B·L, H, D), varlen's layout (a view when t is a
    transposed (B, L, H, D), as transformers' projections make it)."""
    batch, heads, length, dim = t.shape
    return t.transpose(1, 2).reshape(batch * length, heads, dim)


def unflatten_rows(t: torch.Tensor, batch: int) -> torch.Tensor:
    """(B·L, H, D) → (B, L, H, D), the layout transformers' attention functions return."""
    return t.view(batch, t.shape[0] // batch, t.shape[1], t.shape[2])


_SPANS = _SpanCache()


# ---------------------------------------------------------------- attention
def _documents_path(module: nn.Module, query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None,
                    is_causal: bool | None, kwargs: dict[str, Any]) -> torch.Tensor | None:
    """The packed rows' `position_ids` when this call is causal self-attention over a whole row, else None."""
    position_ids = kwargs.get("position_ids")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", False)  # cross-attention: no attr
    if (attention_mask is not None or not causal or not isinstance(position_ids, torch.Tensor)
            or kwargs.get("use_cache") or any(kwargs.get(k) is not None for k in ("cache", "position_bias", "softcap"))):
        return None
    q_len = query.shape[2]
    if q_len != key.shape[2] or position_ids.ndim != 2 or position_ids.shape[1] != q_len \
            or position_ids.shape[0] not in (1, query.shape[0]):
        return None
    return position_ids


def varlen_supported(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout: float) -> bool:
    """Whether `varlen_attn` (flash kernels: CUDA sm80+, half precision, head_dim % 8 == 0 and ≤ 256, no dropout)
    can run this call; otherwise the per-document SDPA loop does."""
    dim = query.shape[-1]
    return (query.is_cuda and query.dtype in (torch.bfloat16, torch.float16)
            and key.dtype == value.dtype == query.dtype and dropout == 0.0 and dim % 8 == 0 and dim <= 256
            and key.shape[-1] == value.shape[-1] == dim and query.shape[1] % key.shape[1] == 0
            and _flash_capable(query.device.index if query.device.index is not None else torch.cuda.current_device()))


@functools.cache
def _flash_capable(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) >= (8, 0)


def _autocast_inputs(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Under CUDA autocast, q/k/v in its half dtype, as autocast hands them to SDPA (RoPE leaves q and k in the
    residual stream's fp32 there); otherwise unchanged."""
    if tensors[0].is_cuda and torch.is_autocast_enabled("cuda"):
        dtype = torch.get_autocast_dtype("cuda")
        if dtype in (torch.bfloat16, torch.float16):
            return tuple(t.to(dtype) for t in tensors)
    return tensors


def attend_varlen(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, segments: Segments,
                  scaling: float | None, kernel: Callable[..., torch.Tensor] = varlen_attn) -> torch.Tensor:
    """Every document of every row in one causal `kernel` call (varlen_attn's signature); returns (B, L, H, D)."""
    batch, group = query.shape[0], query.shape[1] // key.shape[1]
    cu, longest = segments.cu_seqlens(query.device)
    gqa = {}
    if group > 1 and _takes_enable_gqa(kernel):
        gqa["enable_gqa"] = True
    elif group > 1:  # torch 2.11's varlen_attn has no enable_gqa: each KV head repeated for its query group
        key, value = repeat_kv(key, group), repeat_kv(value, group)
    out = kernel(flatten_rows(query), flatten_rows(key), flatten_rows(value), cu, cu, longest, longest,
                 scale=scaling, window_size=(-1, 0), **gqa)
    return unflatten_rows(out, batch)


@functools.cache
def _takes_enable_gqa(kernel: Callable[..., torch.Tensor]) -> bool:
    """varlen_attn takes `enable_gqa` from torch 2.12 on; 2.11's rejects the keyword."""
    return "enable_gqa" in inspect.signature(kernel).parameters


@torch.compiler.disable  # data-dependent segment lengths: run eagerly inside a compiled block, never recompile
def _attend_documents(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, position_ids: torch.Tensor,
                      dropout: float, scaling: float | None, varlen: bool = True) -> torch.Tensor:
    """Causal attention within each document of each row; returns (B, L, H, D) like `sdpa_attention_forward`.

    CUDA (and `varlen`): one `varlen_attn` call (`attend_varlen`). Else SDPA per document: the documents are cut with one `split`
    over (B·L, H, D) views, not by indexing: autograd then joins their gradients with one `cat`, where per-slice
    indexing would give every document a full-size zero gradient.
    """
    batch, heads = query.shape[:2]
    segments = _SPANS.get(position_ids, batch)
    half = _autocast_inputs(query, key, value)
    if varlen and varlen_supported(*half, dropout):
        return attend_varlen(*half, segments, scaling)
    gqa = {}
    if key.shape[1] != heads:
        if use_gqa_in_sdpa(None, key, value):
            gqa["enable_gqa"] = True
        else:
            key, value = repeat_kv(key, heads // key.shape[1]), repeat_kv(value, heads // value.shape[1])
    lengths = [e - s for row in segments.spans for s, e in row]  # rows one after another: sums to B·L

    def documents(t: torch.Tensor) -> tuple[torch.Tensor, ...]:  # (B, H, L, D) → per document (1, H, n, D)
        return tuple(d.transpose(0, 1).unsqueeze(0) for d in flatten_rows(t).split(lengths))

    parts = [
        torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scaling,
                                                         **gqa)[0].transpose(0, 1)  # (n, H, Dv)
        for q, k, v in zip(documents(query), documents(key), documents(value))
    ]
    return unflatten_rows(torch.cat(parts), batch)


def documents_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    *,
    varlen: bool = True,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention interface: per-document attention for packed causal self-attention, else plain `sdpa`.

    `varlen=False` keeps the per-document SDPA loop on CUDA too (the reference path, `PER_DOCUMENT_IMPLEMENTATION`).
    """
    position_ids = _documents_path(module, query, key, attention_mask, is_causal, kwargs)
    if position_ids is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    return _attend_documents(query, key, value, position_ids, dropout, scaling, varlen), None


def documents_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                   mask_function=causal_mask_function, attention_mask: torch.Tensor | None = None,
                   **kwargs: Any) -> torch.Tensor | None:
    """transformers mask interface: no mask for a whole row without padding mask (as `flash_attention_mask`);
    the attention function then splits it by `position_ids`. Anything else: `sdpa_mask`'s mask."""
    config = kwargs.get("config")
    windowed = getattr(config, "sliding_window", None) or getattr(config, "attention_chunk_size", None)
    if (attention_mask is None and q_length == kv_length and _is_zero(q_offset) and _is_zero(kv_offset)
            and not kwargs.get("use_vmap") and not windowed):  # use_vmap: an or/and mask overlay is present
        return None
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask, **kwargs)


def _is_zero(offset: Any) -> bool:
    return isinstance(offset, int) and offset == 0


# ---------------------------------------------------------------- switching a model
def register(varlen: bool = True) -> str:
    """Register the attention and mask functions with transformers (idempotent); returns their name.

    `varlen=False` registers the per-document SDPA loop everywhere (the reference for tests and benchmarks) under
    its own name, so the choice lives in the model's config, not in this process.
    """
    name = DOCUMENTS_IMPLEMENTATION if varlen else PER_DOCUMENT_IMPLEMENTATION
    AttentionInterface.register(name, functools.partial(documents_attention_forward, varlen=varlen))
    AttentionMaskInterface.register(name, documents_mask)
    return name


def _core(model: nn.Module) -> nn.Module:
    get_base = getattr(model, "get_base_model", None)  # a peft wrapper
    return get_base() if callable(get_base) else model


def language_model(model: nn.Module) -> nn.Module:
    """The text decoder of a model of a registered family (its family says where); a plain causal LM's base
    model (`base_model`: transformers' name for it, the model itself when it has none)."""
    from mlan.families.registry import family_for_config  # needed only here

    core = _core(model)
    plugin = family_for_config(core.config)
    return plugin.runtime().language_model(core) if plugin is not None else core.base_model


def set_attention(model: nn.Module, kind: str, varlen: bool = True) -> None:
    """Switch the language model's self-attention to `kind` ("documents" or "sdpa"); vision towers are untouched.

    `varlen=False` ("documents" only): the per-document SDPA loop on CUDA too, never `varlen_attn` (the reference).

    The text sub-config is set through `set_attn_implementation({"text_config": …})`; a LLaVA composed from parts
    (`mlan.families.modeling.compose_llava`) keeps the base LLM's own config object, so the language model is then
    set directly as well.
    """
    if kind not in ATTENTION_CHOICES:
        raise ValueError(f"attention: expected one of {', '.join(map(repr, ATTENTION_CHOICES))}, got {kind!r}")
    impl = register(varlen) if kind == "documents" else "sdpa"
    core = _core(model)
    core.set_attn_implementation({"text_config": impl} if "text_config" in core.config.sub_configs else impl)
    lm = language_model(core)
    if lm.config._attn_implementation != impl:
        lm.set_attn_implementation(impl)
    if lm.config._attn_implementation != impl:
        raise RuntimeError(f"set_attention: {type(lm).__name__} kept attention "
                           f"{lm.config._attn_implementation!r}, wanted {impl!r}")
