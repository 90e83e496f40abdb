"""The tiny Llama-3 text model every tiny config builds on, and the names of the families' tiny configs.

Each family keeps its own tiny config in its folder (`mlan/families/<name>/tiny.py`); what they share is the
Llama-3 vocabulary and special ids, and the small Llama text model (LLaVA's text tower, and the base LLM the
merge tests pair with it). The families' names stay importable from here (`from mlan.families.tiny import
tiny_llava_config`), each forwarded to the module of its family on first use. The vocabulary is the
tokenizer's (the build's `family_config`: Llama-3's 128,256 + the image token by default, SmolLM2's 49,152 +
the image token); Llama-3's special ids are set only when the vocabulary has them. Torch-free at import:
transformers' config classes load only inside the functions that build configs.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import LlamaConfig

LLAMA3_VOCAB = 128256  # 128,000 BPE ranks + 256 special tokens
IMAGE_TOKEN_ID = 128256  # `<|image|>`, added after the specials
BOS_ID, EOT_ID, PAD_ID = 128000, 128009, 128004

# name → the family module that defines it (moved there from this module)
FAMILY_NAMES = {
    **dict.fromkeys(("TINY_LLAVA_VOCAB", "TINY_LLAVA_IMAGE_SIZE", "TINY_LLAVA_PATCH", "TINY_LLAVA_IMAGE_TOKENS",
                     "tiny_llava_config"), "mlan.families.llava.tiny"),
    **dict.fromkeys(("TINY_MLLAMA_TILE", "TINY_MLLAMA_PATCH", "TINY_MLLAMA_MAX_TILES", "tiny_mllama_config"),
                    "mlan.families.mllama.tiny"),
}


def __getattr__(name: str) -> Any:
    """A family's tiny-config name, from its family's module (imported on first use: no import cycle)."""
    module = FAMILY_NAMES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def llama3_special_ids(vocab_size: int) -> dict:
    """Llama-3's BOS / EOS / PAD ids when the vocabulary is Llama-3's, else none (another tokenizer's ids are
    its own business: the model config must not name rows it does not have)."""
    if vocab_size >= LLAMA3_VOCAB:
        return {"bos_token_id": BOS_ID, "eos_token_id": [128001, 128008, EOT_ID], "pad_token_id": PAD_ID}
    return {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}


def tiny_llama_config(num_layers: int = 2, hidden: int = 64, vocab_size: int = IMAGE_TOKEN_ID + 1) -> LlamaConfig:
    """A tiny Llama-3 text model; vocab includes the image token row by default (LLaVA on Llama-3)."""
    from transformers import LlamaConfig  # lazy: see the module docstring (rendering stays torch-free)

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8192,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        **llama3_special_ids(vocab_size),
        tie_word_embeddings=False,
    )
