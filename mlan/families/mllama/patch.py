"""Meta's reference cross-attention semantics for transformers' Mllama (transformers issue #39379).

Meta's reference (llama-models, `models/llama3/multimodal/model.py`, `CrossAttention.forward`) computes

    output = F.scaled_dot_product_attention(xq, xk, xv, attn_mask=xattn_mask)
    output = output * full_text_row_masked_out_mask

so a text position that may see no image tile gets *zero* from cross-attention. transformers 5.23's
`MllamaCrossAttentionDecoderLayer.forward` applies `full_text_row_masked_out_mask` only to the
cross-attention MLP. For a fully masked row, `_prepare_cross_attention_mask` multiplies the additive
mask by that same zero row mask, which turns "-inf everywhere" into "0 everywhere": the position then
attends *uniformly to every image tile in the row*, and once the (zero-initialised) gates move away from
zero a text-only document packed next to an image document reads that image. The same happens to the
tokens before a document's first `<|image|>` and, with a dummy image, to text-only micro-batches.

`apply_reference_cross_attention(model)` replaces the forward of every cross-attention decoder layer of
`model` (an instance-level patch, nothing global) with one that multiplies the attention output by the
row mask before the gate, as the reference does. `o_proj` has no bias, so masking after it is the same
as masking before it. With that, a fully masked row passes through the layer unchanged (the residual,
bit for bit), exactly what a model that skips the layer computes. Idempotent; returns the model.
"""
from __future__ import annotations

import types

import torch
from torch import nn
from transformers.models.mllama.modeling_mllama import MllamaCrossAttentionDecoderLayer

_MARK = "_mlan_reference_cross_attention"


def _reference_forward(
    self,
    hidden_states: torch.Tensor,
    cross_attention_states: torch.Tensor,
    cross_attention_mask: torch.Tensor,
    attention_mask: torch.Tensor,
    full_text_row_masked_out_mask: torch.Tensor | None,
    position_ids: torch.LongTensor | None = None,
    past_key_values=None,
    use_cache: bool | None = False,
    position_embeddings: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor:
    """transformers' `MllamaCrossAttentionDecoderLayer.forward` plus the reference's output row mask."""
    residual = hidden_states
    hidden_states = self.input_layernorm(hidden_states)
    hidden_states, _ = self.cross_attn(
        hidden_states=hidden_states,
        attention_mask=cross_attention_mask,
        cross_attention_states=cross_attention_states,
        past_key_values=past_key_values,
        **kwargs,
    )
    if full_text_row_masked_out_mask is not None:
        # (B, 1, S, 1) → (B, S, 1): zero for positions that may see no image tile (Meta: CrossAttention.forward)
        hidden_states = full_text_row_masked_out_mask[:, 0] * hidden_states
    hidden_states = residual + self.cross_attn_attn_gate.tanh() * hidden_states

    residual = hidden_states
    hidden_states = self.post_attention_layernorm(hidden_states)
    hidden_states = self.mlp(hidden_states)
    if full_text_row_masked_out_mask is not None:
        hidden_states = full_text_row_masked_out_mask[:, 0] * hidden_states
    return residual + self.cross_attn_mlp_gate.tanh() * hidden_states


def _cross_attention_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, MllamaCrossAttentionDecoderLayer)]


def apply_reference_cross_attention(model: nn.Module) -> nn.Module:
    """Give every Mllama cross-attention layer of `model` Meta's output row mask; idempotent, returns `model`."""
    for layer in _cross_attention_layers(model):
        if not getattr(layer, _MARK, False):
            layer.forward = types.MethodType(_reference_forward, layer)
            setattr(layer, _MARK, True)
    return model


def has_reference_cross_attention(model: nn.Module) -> bool:
    """True when the model has cross-attention layers and every one of them carries the patch."""
    layers = _cross_attention_layers(model)
    return bool(layers) and all(getattr(layer, _MARK, False) for layer in layers)
