"""Mllama's tiny config: the real shape pattern (cross-attention every 5th layer from layer 3, as in
Llama-3.2-11B-Vision) with small widths and small image tiles, for tests, the demo and CPU smoke runs. The
sizes below are also what Mllama's torch-free geometry reads for `model.config: tiny`, so transformers' config
classes are imported only inside the function that builds one."""
from __future__ import annotations

from typing import TYPE_CHECKING

from mlan.families.tiny import IMAGE_TOKEN_ID, LLAMA3_VOCAB, llama3_special_ids

if TYPE_CHECKING:
    from transformers import MllamaConfig

TINY_MLLAMA_TILE = 56  # real: 560
TINY_MLLAMA_PATCH = 14
TINY_MLLAMA_MAX_TILES = 4


def tiny_mllama_config(num_layers: int = 10, hidden: int = 64, vocab_size: int = LLAMA3_VOCAB,
                       image_token_id: int = IMAGE_TOKEN_ID) -> MllamaConfig:
    """Cross-attention at 3, 8, 13, … like the 11B model's [3, 8, …, 38] over 40 layers. `vocab_size` is the
    tokenizer's without the image token (Mllama's lm_head has no row for it; its embedding has 8 extra rows)."""
    from transformers import MllamaConfig  # lazy: see the module docstring

    cross = list(range(3, num_layers, 5))
    text = {
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": hidden * 2,
        "num_hidden_layers": num_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "cross_attention_layers": cross,
        "max_position_embeddings": 131072,
        "rope_parameters": {
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
        },
        # MllamaTextConfig needs an int BOS: with another tokenizer, id 0 (in range; training never reads it)
        **{k: 0 if v is None and k == "bos_token_id" else v for k, v in llama3_special_ids(vocab_size).items()},
        "tie_word_embeddings": False,
    }
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_global_layers": 1,
        "attention_heads": 2,
        "image_size": TINY_MLLAMA_TILE,
        "patch_size": TINY_MLLAMA_PATCH,
        "max_num_tiles": TINY_MLLAMA_MAX_TILES,
        "intermediate_layers_indices": [0, 1],
        "vision_output_dim": 32 * 3,
        "supported_aspect_ratios": [[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]],
    }
    return MllamaConfig(vision_config=vision, text_config=text, image_token_index=image_token_id)
