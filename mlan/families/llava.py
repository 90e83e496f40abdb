"""LLaVA-style: each image becomes N placeholder tokens in the sequence (N = image_tokens, 576 for CLIP-336)."""
from __future__ import annotations

from mlan.families.base import Family


class LlavaFamily(Family):
    name = "llava"
    default_template = "llama3"

    def image_seq_tokens(self) -> int:
        return self.geometry.image_tokens

    def tiles_for(self, width: int, height: int) -> int:
        return 1

    def vision_tokens_for(self, width: int, height: int) -> int:
        return self.geometry.image_tokens

    def vocab_size(self) -> int:
        """LLaVA on Llama-3 trains an embedding row for the added image token: the whole tokenizer."""
        if self.geometry.vocab_size is not None:
            return self.geometry.vocab_size
        return len(self.tokenizer)
