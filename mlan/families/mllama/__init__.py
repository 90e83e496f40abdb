"""The Mllama (Llama-3.2-Vision) family plug-in (torch-free): registers itself; torch side in `.runtime`."""
from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from mlan.families.base import Family, FamilyPlugin, VisionGeometry
from mlan.families.mllama.geometry import MllamaFamily, mllama_geometry
from mlan.families.registry import register

if TYPE_CHECKING:
    from mlan.recipe import ModelSpec


class MllamaPlugin(FamilyPlugin):
    """Llama-3.2-Vision models: a full checkpoint or a tiny config; cross-attention to image tiles."""

    name = "mllama"
    model_type = "mllama"
    runtime_module = "mlan.families.mllama.runtime"
    scores_on_context_cache = False

    def geometry(self, model: ModelSpec) -> VisionGeometry:
        return mllama_geometry(model)

    def family(self, model: ModelSpec, geometry: VisionGeometry) -> Family:
        return MllamaFamily(model, geometry)

    def check_config(self, family_config: Mapping[str, Any]) -> None:
        if family_config.get("image_token_id") is None:
            raise ValueError("family_config.image_token_id: missing (mllama needs the <|image|> id)")
        if not family_config.get("tile_size"):
            raise ValueError("family_config.tile_size: missing (mllama needs the tile side)")


register(MllamaPlugin())
