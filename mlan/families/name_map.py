"""Which tensor of a VLM's language tower is which tensor of its base LLM, read from the tensor names.

Two VLM layouts exist on disk: transformers' legacy one (`language_model.model.*`,
`language_model.lm_head.*`; what `save_pretrained` writes in 5.x) and the in-memory one
(`model.language_model.*`, `lm_head.*`). The base LLM is a plain `LlamaForCausalLM`
(`model.*`, `lm_head.*`). LLaVA-on-Llama maps by prefix; Mllama's text tower has cross-attention
layers inserted between Llama's layers, so its self-attention layer i is base layer
i − (cross-attention layers before i). Everything else (vision tower, projector, cross-attention
layers and their gates) has no counterpart and stays the VLM's.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from mlan.errors import MlanError

LLM_BODY, LLM_HEAD = "model.", "lm_head."


class NameMapError(MlanError, ValueError):
    """The two checkpoints do not correspond; the message names the tensor or layer at fault."""


@dataclass(frozen=True)
class TowerLayout:
    """Where a VLM keeps its language tower: the decoder body prefix and the LM head prefix."""

    body: str
    head: str


VLM_LAYOUTS = (
    TowerLayout(body="language_model.model.", head="language_model.lm_head."),  # on disk (legacy)
    TowerLayout(body="model.language_model.", head="lm_head."),  # in memory (transformers ≥ 4.52)
)

_LAYER = re.compile(r"layers\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class NameMap:
    """VLM tensor name → base LLM tensor name, plus what stays the VLM's and why."""

    pairs: dict[str, str]
    kept: tuple[str, ...]  # VLM tensors with no counterpart (vision, projector, cross-attention)
    layout: TowerLayout
    layer_map: dict[int, int]  # VLM text layer → base layer (self-attention layers only)
    cross_attention_layers: tuple[int, ...]


def self_attention_layer_map(num_layers: int, cross_attention_layers: Iterable[int]) -> dict[int, int]:
    """VLM text layer i → base layer i − #cross-attention layers before i; cross layers have no base layer."""
    cross = sorted(set(cross_attention_layers))
    bad = [i for i in cross if not 0 <= i < num_layers]
    if bad:
        raise NameMapError(f"cross-attention layers {bad} outside the text tower's {num_layers} layers")
    mapping, seen = {}, 0
    for i in range(num_layers):
        if seen < len(cross) and cross[seen] == i:
            seen += 1
            continue
        mapping[i] = i - seen
    return mapping


def detect_layout(vlm_names: Iterable[str]) -> TowerLayout:
    """The layout whose body prefix holds the VLM's decoder layers."""
    names = list(vlm_names)
    found = [lay for lay in VLM_LAYOUTS if any(n.startswith(lay.body + "layers.") for n in names)]
    if len(found) != 1:
        prefixes = " or ".join(repr(lay.body + "layers.") for lay in VLM_LAYOUTS)
        what = "both" if found else "neither"
        raise NameMapError(f"VLM checkpoint has {what} of the language-tower prefixes {prefixes}")
    return found[0]


def _layer_index(name: str, body: str) -> tuple[int, str] | None:
    if not name.startswith(body):
        return None
    m = _LAYER.match(name[len(body):])
    return (int(m.group(1)), m.group(2)) if m else None


def cross_attention_layers_of(vlm_names: Iterable[str], layout: TowerLayout) -> tuple[int, ...]:
    """Text layers that hold cross-attention tensors (Mllama); empty for LLaVA."""
    cross = set()
    for name in vlm_names:
        hit = _layer_index(name, layout.body)
        if hit and hit[1].startswith("cross_attn"):
            cross.add(hit[0])
    return tuple(sorted(cross))


def map_names(vlm_names: Sequence[str], llm_names: Sequence[str]) -> NameMap:
    """Pair every language-tower tensor of the VLM with its base-LLM tensor; error on any gap.

    A VLM tensor whose mapped name the LLM lacks, or an LLM tensor no VLM tensor maps to, is an error
    naming it. A base LLM without `lm_head.weight` (tied embeddings) lends its `embed_tokens` to the
    VLM's LM head.
    """
    layout = detect_layout(vlm_names)
    llm = set(llm_names)
    if not any(n.startswith(LLM_BODY + "layers.") for n in llm):
        raise NameMapError(f"base LLM checkpoint has no {LLM_BODY}layers.* tensors "
                           "(is it a LlamaForCausalLM?)")
    text_layers = {hit[0] for n in vlm_names if (hit := _layer_index(n, layout.body))}
    num_layers = max(text_layers) + 1
    cross = cross_attention_layers_of(vlm_names, layout)
    layer_map = self_attention_layer_map(num_layers, cross)
    llm_layers = {hit[0] for n in llm if (hit := _layer_index(n, LLM_BODY))}
    if llm_layers != set(range(len(layer_map))):
        raise NameMapError(
            f"VLM text tower has {num_layers} layers with cross-attention at {list(cross)}, so its base LLM "
            f"needs {len(layer_map)} layers; the LLM checkpoint has {len(llm_layers)}"
        )
    tied_head = f"{LLM_HEAD}weight" not in llm
    pairs: dict[str, str] = {}
    kept: list[str] = []
    for name in vlm_names:
        if name.startswith(layout.head):
            target = LLM_HEAD + name[len(layout.head):]
            if tied_head and target == f"{LLM_HEAD}weight":
                target = f"{LLM_BODY}embed_tokens.weight"
        elif name.startswith(layout.body):
            hit = _layer_index(name, layout.body)
            if hit is None:
                target = LLM_BODY + name[len(layout.body):]
            elif hit[0] in layer_map:
                target = f"{LLM_BODY}layers.{layer_map[hit[0]]}.{hit[1]}"
            else:
                kept.append(name)  # a cross-attention layer: no base counterpart
                continue
        else:
            kept.append(name)  # vision tower, projector
            continue
        if target not in llm:
            raise NameMapError(f"VLM tensor {name!r} maps to {target!r}, which the base LLM checkpoint lacks")
        pairs[name] = target
    unused = sorted(llm - set(pairs.values()))
    if unused:
        more = f" (+{len(unused) - 5} more)" if len(unused) > 5 else ""
        raise NameMapError(f"base LLM tensors with no VLM counterpart: {', '.join(unused[:5])}{more}")
    return NameMap(pairs=pairs, kept=tuple(kept), layout=layout, layer_map=layer_map,
                   cross_attention_layers=cross)
