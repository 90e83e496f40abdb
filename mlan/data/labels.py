"""The label convention the data layer writes and the losses read (torch-free, so any layer may import it)."""
from __future__ import annotations

IGNORE_INDEX = -100
"""A label position that takes no loss: prompts, image placeholders, document starts, padding (the value
torch's cross_entropy and transformers ignore by default)."""
