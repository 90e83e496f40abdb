"""The Mllama (Llama-3.2-Vision) family plug-in (torch-free): registers itself; torch side in `.runtime`."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from mlan.families.base import Family, FamilyPlugin, VisionGeometry
from mlan.families.mllama.geometry import MllamaFamily, mllama_geometry
from mlan.families.name_map import NameMap, map_names
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

    def merge_name_map(self, vlm_names: Sequence[str], llm_names: Sequence[str]) -> NameMap:
        """Self-attention layer i is base layer i − (cross-attention layers before i), read from the names."""
        return map_names(vlm_names, llm_names)


register(MllamaPlugin())
