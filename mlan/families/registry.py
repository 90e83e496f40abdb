"""The model-family registry: name → family; every folder under `mlan/families/` is a plug-in that registers
itself here when this module imports it, and so is every module named in `MLAN_FAMILY_MODULES` (comma-separated
importable modules: a family kept outside mlan; the variable reaches Ray workers and torchrun's workers, which
inherit the environment, and each imports this module before it needs a family).

Lookups by family name (a recipe's `model.family`, a manifest's `family_config["family"]`) or by a checkpoint's
config (eval, merge, the trainer's model): its `mlan_family` when a family that shares another's
`config.model_type` wrote one, else its `model_type`. Torch-free: recipe parsing validates `model.family`
against `family_names()`.
"""
from __future__ import annotations

import importlib
import os
import pkgutil
from collections.abc import Mapping
from typing import Any

from mlan.errors import MlanError
from mlan.families.base import Family, FamilyPlugin, ModelSection

_FAMILIES: dict[str, FamilyPlugin] = {}

FAMILY_MODULES_ENV = "MLAN_FAMILY_MODULES"  # extra family modules to import, comma-separated
CONFIG_FAMILY_KEY = "mlan_family"  # in a checkpoint's config.json: the family, where model_type is ambiguous


class FamilyLookupError(MlanError, ValueError):
    """A family module that cannot be imported, or a checkpoint naming a family that is not registered."""


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
    """The plug-in whose checkpoints have this Hugging Face `config.model_type`; None for any other model.

    Where several share a model_type (a LLaVA on another decoder is still "llava"), the one named after it wins;
    the others are found through the `mlan_family` their checkpoints carry (`family_for_config`).
    """
    matches = [p for p in _FAMILIES.values() if p.model_type == model_type]
    return next((p for p in matches if p.name == model_type), matches[0] if matches else None)


def family_for_config(config: Any) -> FamilyPlugin | None:
    """The family of a checkpoint's config (a transformers config or config.json as a dict): its `mlan_family`
    when present, else its `model_type`; None for a model of no family (a text-only causal LM)."""
    read = config.get if isinstance(config, Mapping) else lambda key: getattr(config, key, None)
    named = read(CONFIG_FAMILY_KEY)
    if named is not None:
        plugin = find_family(named)
        if plugin is None:
            raise FamilyLookupError(
                f"config.json: {CONFIG_FAMILY_KEY} {named!r} is not a registered family (registered: "
                f"{', '.join(family_names())}; a family outside mlan is imported through {FAMILY_MODULES_ENV})")
        return plugin
    model_type = read("model_type")
    return family_for_model_type(model_type) if model_type else None


def config_marks(plugin: FamilyPlugin) -> dict[str, str]:
    """What a model of `plugin` carries in its config so its checkpoints find it again: nothing where the
    model_type alone finds it (the built-in families' exports stay as they were), else `mlan_family`."""
    return {} if family_for_model_type(plugin.model_type) is plugin else {CONFIG_FAMILY_KEY: plugin.name}


def get_family(model: ModelSection) -> Family:
    """The render-side family object for a recipe's `model:` section."""
    plugin = family_plugin(model.family)
    return plugin.family(model, plugin.geometry(model))


def same_modules_inputs(batch: dict[str, Any], family_config: Mapping[str, Any]) -> Any:
    """The family's hook that makes a micro-batch run the modules every rank runs (FSDP); None when not needed."""
    plugin = find_family(family_config.get("family"))
    return plugin.runtime().same_modules_inputs(batch, family_config) if plugin is not None else None


def family_modules() -> list[str]:
    """The modules `MLAN_FAMILY_MODULES` names, in order (blanks ignored)."""
    return [m.strip() for m in os.environ.get(FAMILY_MODULES_ENV, "").split(",") if m.strip()]


def _discover() -> None:
    """Import every family folder (sub-package) of `mlan.families`, then each module of `MLAN_FAMILY_MODULES`;
    each registers itself. A module outside mlan that builds on a built-in family imports that family's
    submodules (`mlan.families.llava.geometry`, …): its package may still be running its `__init__` here."""
    package = importlib.import_module(__package__)
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if info.ispkg:
            importlib.import_module(f"{__package__}.{info.name}")
    for module in family_modules():
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise FamilyLookupError(f"{FAMILY_MODULES_ENV}: cannot import family module {module!r} "
                                    f"({type(err).__name__}: {err})") from None


_discover()
