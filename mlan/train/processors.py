"""The processor saved next to an exported model: the run's tokenizer plus the family's image processor.

Built from the build's `family_config` (the same geometry the loader used), never fetched from the hub.
"""
from __future__ import annotations

from typing import Any

from mlan.families.registry import find_family


def family_processor(family_config: dict[str, Any], tokenizer: Any) -> Any:
    """The family's HF processor (e.g. LlavaProcessor, MllamaProcessor) matching the training images."""
    family = family_config["family"]
    plugin = find_family(family)
    if plugin is None:
        raise ValueError(f"family_config.family: unknown family {family!r}")
    return plugin.runtime().processor(family_config, tokenizer)
