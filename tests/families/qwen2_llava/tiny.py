"""The tiny qwen2-llava: a 2-layer Qwen2 decoder (biased q/k/v, unlike Llama) under a 2-layer CLIP tower on
28-px images (4 placeholders per image), random weights. Torch-free at import (the geometry reads the sizes)."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import LlavaConfig

IMAGE_SIZE, PATCH = 28, 14
IMAGE_TOKENS = (IMAGE_SIZE // PATCH) ** 2  # CLS dropped (vision_feature_select_strategy "default")


def tiny_qwen2_llava_config(vocab_size: int, image_token_id: int, image_size: int = IMAGE_SIZE,
                            patch: int = PATCH) -> LlavaConfig:
    """`vocab_size` rows (the tokenizer's, the image token's included) in the Qwen2 embedding and head."""
    from transformers import CLIPVisionConfig, LlavaConfig, Qwen2Config

    text = Qwen2Config(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                       tie_word_embeddings=False)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=image_size, patch_size=patch, projection_dim=32)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token_id,
                       image_seq_length=(image_size // patch) ** 2, projector_hidden_act="gelu",
                       vision_feature_select_strategy="default", vision_feature_layer=-2, tie_word_embeddings=False)
