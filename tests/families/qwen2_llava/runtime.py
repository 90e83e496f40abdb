"""qwen2-llava's torch side: LLaVA's (same checkpoint class, processor, image inputs and anatomy), with its own
tiny model."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn
from transformers import LlavaForConditionalGeneration

from mlan.families.llava.runtime import LlavaRuntime

from . import tiny


class Qwen2LlavaRuntime(LlavaRuntime):
    def build_tiny(self, family_config: Mapping[str, Any]) -> nn.Module:
        """The tiny model at the build's vocabulary, image token and image geometry."""
        config = tiny.tiny_qwen2_llava_config(
            vocab_size=int(family_config["vocab_size"]), image_token_id=int(family_config["image_token_id"]),
            image_size=int(family_config["image_size"]), patch=int(family_config["patch_size"]))
        return LlavaForConditionalGeneration(config)


RUNTIME = Qwen2LlavaRuntime()
