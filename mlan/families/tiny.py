"""Tiny configs of the real architectures, for tests, the demo and CPU smoke runs.

They keep the real shape pattern (Mllama cross-attention every 5th layer from layer 3, as in
Llama-3.2-11B-Vision) with small widths and small image tiles. The vocabulary is the tokenizer's (the build's
`family_config`: Llama-3's 128,256 + the image token by default, SmolLM2's 49,152 + the image token); Llama-3's
special ids are set only when the vocabulary has them.
The sizes below are also what the families' torch-free geometry reads for `model.config: tiny`, so this
module imports transformers' config classes (which load torch: ~3 s after `import mlan.recipe`) only inside the
functions that build them.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import LlamaConfig, LlavaConfig, MllamaConfig

LLAMA3_VOCAB = 128256  # 128,000 BPE ranks + 256 special tokens
IMAGE_TOKEN_ID = 128256  # `<|image|>`, added after the specials
BOS_ID, EOT_ID, PAD_ID = 128000, 128009, 128004

TINY_LLAVA_VOCAB = IMAGE_TOKEN_ID + 1  # LLaVA on Llama-3: the image token gets an embedding row

TINY_LLAVA_IMAGE_SIZE = 56
TINY_LLAVA_PATCH = 14
TINY_LLAVA_IMAGE_TOKENS = (TINY_LLAVA_IMAGE_SIZE // TINY_LLAVA_PATCH) ** 2  # 16 (CLS dropped)

TINY_MLLAMA_TILE = 56  # real: 560
TINY_MLLAMA_PATCH = 14
TINY_MLLAMA_MAX_TILES = 4


def llama3_special_ids(vocab_size: int) -> dict:
    """Llama-3's BOS / EOS / PAD ids when the vocabulary is Llama-3's, else none (another tokenizer's ids are
    its own business: the model config must not name rows it does not have)."""
    if vocab_size >= LLAMA3_VOCAB:
        return {"bos_token_id": BOS_ID, "eos_token_id": [128001, 128008, EOT_ID], "pad_token_id": PAD_ID}
    return {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}


def tiny_llama_config(num_layers: int = 2, hidden: int = 64, vocab_size: int = TINY_LLAVA_VOCAB) -> LlamaConfig:
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


def tiny_llava_config(num_layers: int = 2, hidden: int = 64, vocab_size: int = TINY_LLAVA_VOCAB,
                      image_token_id: int = IMAGE_TOKEN_ID) -> LlavaConfig:
    """A tiny LLaVA: CLIP tower at TINY_LLAVA_IMAGE_SIZE, a Llama text model over `vocab_size` rows (the
    tokenizer's, the image token's row included: Llama-3's by default)."""
    from transformers import CLIPVisionConfig, LlavaConfig  # lazy: see the module docstring

    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=TINY_LLAVA_IMAGE_SIZE,
        patch_size=TINY_LLAVA_PATCH,
        projection_dim=32,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=tiny_llama_config(num_layers, hidden, vocab_size),
        image_token_index=image_token_id,
        image_seq_length=TINY_LLAVA_IMAGE_TOKENS,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        tie_word_embeddings=False,
    )


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
