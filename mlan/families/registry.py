"""The model-family registry: name → family; every folder under `mlan/families/` is a plug-in that registers
itself here when this module imports it.

Lookups by family name (a recipe's `model.family`, a manifest's `family_config["family"]`) or by a checkpoint's
`config.model_type` (eval). Torch-free: recipe parsing validates `model.family` against `family_names()`.
"""
from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from mlan.families.base import Family, FamilyPlugin

if TYPE_CHECKING:  # types only: mlan.recipe imports this package
    from mlan.recipe import ModelSpec

_FAMILIES: dict[str, FamilyPlugin] = {}


def register(plugin: FamilyPlugin) -> FamilyPlugin:
    """Add a family (a folder's `__init__` calls this on import); a later registration of a name replaces it."""
    _FAMILIES[plugin.name] = plugin
    return plugin


def family_names() -> tuple[str, ...]:
    """The registered family names, sorted."""
    return tuple(sorted(_FAMILIES))


def find_family(name: str | None) -> FamilyPlugin | None:
    """The plug-in registered as `name`, None when there is none."""
    return _FAMILIES.get(name) if name is not None else None


def family_plugin(name: str) -> FamilyPlugin:
    """The plug-in registered as `name`; a ValueError listing the registered names otherwise."""
    plugin = find_family(name)
    if plugin is None:
        raise ValueError(f"unknown model family {name!r}; allowed: {', '.join(family_names())}")
    return plugin


def family_for_model_type(model_type: str) -> FamilyPlugin | None:
    """The plug-in whose checkpoints have this Hugging Face `config.model_type`; None for any other model."""
    return next((p for p in _FAMILIES.values() if p.model_type == model_type), None)


def get_family(model: ModelSpec) -> Family:
    """The render-side family object for a recipe's `model:` section."""
    plugin = family_plugin(model.family)
    return plugin.family(model, plugin.geometry(model))


def same_modules_inputs(batch: dict[str, Any], family_config: Mapping[str, Any]) -> Any:
    """The family's hook that makes a micro-batch run the modules every rank runs (FSDP); None when not needed."""
    plugin = find_family(family_config.get("family"))
    return plugin.runtime().same_modules_inputs(batch, family_config) if plugin is not None else None


def _discover() -> None:
    """Import every family folder (sub-package) of `mlan.families`; each registers itself."""
    package = importlib.import_module(__package__)
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if info.ispkg:
            importlib.import_module(f"{__package__}.{info.name}")


_discover()
