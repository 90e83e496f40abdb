"""A model folder (or a named offline base) → the model, its tokenizer and geometry for eval; a batch's image inputs.

Below the scorers and the harness: both take a `Loaded`, neither is imported here.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from mlan.errors import UserError
from mlan.families.base import ModelGeometry
from mlan.families.registry import family_for_config, family_plugin
from mlan.pretrained import resolve_model_path
from mlan.weights import check_model_dir, load_checked

# a batch's ids and its image paths (None: a text batch) → the model's extra forward arguments
ModelInputs = Callable[[torch.Tensor, "list[str] | None"], dict[str, torch.Tensor]]


@dataclass
class Loaded:
    """A model with what its prompts and images need."""

    model: torch.nn.Module
    tokenizer: Any
    geometry: ModelGeometry | None  # the checkpoint's, read from its config; None for a text-only causal LM
    stop_ids: list[int]

    @property
    def family(self) -> str | None:
        """The registered family name; None for a text-only causal LM."""
        return self.geometry.family if self.geometry is not None else None


def load_model(path: str) -> Loaded:
    """A model folder (save_pretrained) or hub id → model in eval mode + tokenizer; UserError names the path."""
    path = resolve_model_path(path)  # a named offline base (e.g. smollm2-135m-instruct) → its converted folder
    p = Path(path)
    if p.exists() and not (p / "config.json").is_file():
        raise UserError(f"{path}: not a model directory (no config.json)")
    check_model_dir(path)  # safetensors only, headers sound: never unpickle, never trust a length field
    try:
        cfg = AutoConfig.from_pretrained(path)
    except Exception as err:  # noqa: BLE001 - transformers raises many types for a bad folder/id
        raise UserError(f"{path}: not a model directory or hub id ({type(err).__name__}: {str(err).splitlines()[0]})") from None
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as err:  # noqa: BLE001
        raise UserError(f"{path}: the model has no usable tokenizer ({type(err).__name__}: {str(err).splitlines()[0]})") from None
    plugin = family_for_config(cfg)  # `mlan_family` where a family shares another's model_type
    if plugin is not None:
        model, geometry = plugin.runtime().eval_model(path, cfg)
        geometry = replace(geometry, family=plugin.name)  # a plug-in may share another family's runtime
        loaded = Loaded(model, tok, geometry, [])
    else:
        try:
            model = load_checked(AutoModelForCausalLM.from_pretrained, path)  # damaged weights: one line
        except Exception as err:  # noqa: BLE001
            raise UserError(f"{path}: not a causal LM ({type(err).__name__}: {str(err).splitlines()[0]})") from None
        loaded = Loaded(model, tok, None, [])
    model.eval().to(eval_device())
    stops = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    for t in ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"):
        i = tok.convert_tokens_to_ids(t)
        if isinstance(i, int) and i != tok.unk_token_id and tok.convert_ids_to_tokens(i) == t:
            stops.add(i)
    loaded.stop_ids = sorted(s for s in stops if s is not None)
    return loaded


def eval_device() -> torch.device:
    """This process's GPU when there is one (`LOCAL_RANK`'s under `--nproc`), else the CPU: eval runs where
    training would, so a GPU machine never scores on its CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def _open_image(path: str):
    with Image.open(path) as im:
        return im.convert("RGB")


def _forward_kwargs(lm: Loaded, ids: torch.Tensor, images: list[str] | None) -> dict[str, torch.Tensor]:
    """The family's image inputs for one image per sequence (same preprocessing as mlan's training loader)."""
    if not images:
        return {}
    if lm.geometry is None:
        raise UserError("image inputs were asked of a text-only model")
    return family_plugin(lm.geometry.family).runtime().eval_inputs(ids, [_open_image(p) for p in images], lm.geometry)


def model_inputs(lm: Loaded) -> ModelInputs:
    """What the scorers call for a batch's image inputs."""
    return partial(_forward_kwargs, lm)
