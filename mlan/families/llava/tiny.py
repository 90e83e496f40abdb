"""LLaVA's tiny config: a CLIP tower on small images over the tiny Llama-3 text model, for tests, the demo
and CPU smoke runs. The sizes below are also what LLaVA's torch-free geometry reads for `model.config: tiny`, so
transformers' config classes are imported only inside the function that builds one."""
from __future__ import annotations

from typing import TYPE_CHECKING

from mlan.families.tiny import IMAGE_TOKEN_ID, tiny_llama_config

if TYPE_CHECKING:
    from transformers import LlavaConfig

TINY_LLAVA_VOCAB = IMAGE_TOKEN_ID + 1  # LLaVA on Llama-3: the image token gets an embedding row

TINY_LLAVA_IMAGE_SIZE = 56
TINY_LLAVA_PATCH = 14
TINY_LLAVA_IMAGE_TOKENS = (TINY_LLAVA_IMAGE_SIZE // TINY_LLAVA_PATCH) ** 2  # 16 (CLS dropped)


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
