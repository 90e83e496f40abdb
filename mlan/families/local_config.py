"""Model configs read from local files only (a folder or the local Hugging Face cache), for family geometry.

Never goes to the network: rendering must not stall on an unreachable hub. Without a readable config the
real defaults and the recipe's `model.*` keys apply, and family_config records what was used.
"""
from __future__ import annotations

from typing import Any


def load_local_config(name: str | None) -> Any | None:
    """A model/vision config from a local folder or the local Hugging Face cache; None when not available."""
    if not name or name == "tiny":
        return None
    # lazy: recipe parsing imports the families; AutoConfig costs ~2.1 s (it loads torch), not needed for `tiny`
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError, KeyError):
        return None


def vision_config(cfg: Any) -> Any:
    """The vision half of a VLM config, or the config itself (a bare vision-tower config)."""
    return getattr(cfg, "vision_config", None) or cfg
