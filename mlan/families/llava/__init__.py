"""The LLaVA family plug-in (torch-free): registers itself; its torch side is `mlan.families.llava.runtime`."""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from mlan.families.base import Family, FamilyPlugin, VisionGeometry
from mlan.families.llava.geometry import LlavaFamily, llava_geometry
from mlan.families.name_map import NameMap, map_names
from mlan.families.registry import register

if TYPE_CHECKING:
    from mlan.recipe import ModelSpec


class LlavaPlugin(FamilyPlugin):
    """LLaVA-1.5 style models: a full checkpoint, a tiny config, or composed from an LLM and a CLIP/SigLIP tower."""

    name = "llava"
    model_type = "llava"
    runtime_module = "mlan.families.llava.runtime"
    composes_from_parts = True

    def geometry(self, model: ModelSpec) -> VisionGeometry:
        return llava_geometry(model)

    def family(self, model: ModelSpec, geometry: VisionGeometry) -> Family:
        return LlavaFamily(model, geometry)

    def placeholders_per_image(self, image_tokens: int) -> int:
        return image_tokens

    def merge_name_map(self, vlm_names: Sequence[str], llm_names: Sequence[str]) -> NameMap:
        """LLaVA-on-Llama: the language tower maps to the base LLM by prefix."""
        return map_names(vlm_names, llm_names)


register(LlavaPlugin())
