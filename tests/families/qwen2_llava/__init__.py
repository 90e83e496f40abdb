"""A third model family kept outside mlan, to show that one folder is a family: LLaVA on a Qwen2 decoder
(`qwen2-llava`), registered when `MLAN_FAMILY_MODULES=tests.families.qwen2_llava` names this package.

Torch-free, like the built-in families' `__init__`: rendering imports it. It builds only its tiny config
(`tiny.py`); its torch side (`runtime.py`) is LLaVA's, since the checkpoint class is the same
`LlavaForConditionalGeneration`. That class's `model_type` is "llava" whatever the decoder, so mlan writes
`mlan_family: qwen2-llava` into the config of every model it builds of this family, and eval and merge read it.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from mlan.families.base import Family, FamilyPlugin, ModelBuildError, VisionGeometry
from mlan.families.llava.geometry import LlavaFamily  # a submodule: the llava package may be mid-import here
from mlan.families.name_map import NameMap, map_names
from mlan.families.registry import register

from . import tiny

if TYPE_CHECKING:
    from mlan.recipe import ModelSpec


class Qwen2LlavaFamily(LlavaFamily):
    """LLaVA's token accounting (N placeholders per image) under this family's name."""

    name = "qwen2-llava"


class Qwen2LlavaPlugin(FamilyPlugin):
    name = "qwen2-llava"
    model_type = "llava"  # shared with the built-in llava: its checkpoints say `mlan_family`
    runtime_module = f"{__name__}.runtime"  # whatever name this package is imported under

    def geometry(self, model: ModelSpec) -> VisionGeometry:
        if model.config != "tiny":
            raise ModelBuildError(f"model.config: {self.name} builds only `tiny`, got {model.config!r}")
        return VisionGeometry(image_size=tiny.IMAGE_SIZE, patch_size=tiny.PATCH, image_tokens=tiny.IMAGE_TOKENS,
                              max_tiles=1)

    def family(self, model: ModelSpec, geometry: VisionGeometry) -> Family:
        return Qwen2LlavaFamily(model, geometry)

    def placeholders_per_image(self, image_tokens: int) -> int:
        return image_tokens

    def merge_name_map(self, vlm_names: Sequence[str], llm_names: Sequence[str]) -> NameMap:
        return map_names(vlm_names, llm_names)  # LLaVA's layout: the tower maps to a Qwen2ForCausalLM by prefix


register(Qwen2LlavaPlugin())
