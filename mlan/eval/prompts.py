"""Eval prompts: a user message rendered by the build's template and piece encoder, cut where the answer starts.

The tokens before the first trained token of a training document are exactly what eval feeds the model, so
a score measures what training taught. An exported model folder does not name its recipe's template, so the
choice is made the way a recipe's can succeed: `llama3` (every family's default) when the tokenizer has the
Llama-3 header tokens, else the tokenizer's own chat_template (recipes with `template: tokenizer`, e.g.
SmolLM2's ChatML), else a bare BOS + text for a base model without any chat format.

A recipe's eval task that names its training source (`source: nlvr`, a `template` source) gets the prompt the
build renders for that record: `mlan.eval.tasks.training_conversation` converts the eval record with the source
itself (the paraphrase its seed picks for the record, its system prompt, its image placement) and
`conversation_ids` cuts that conversation's ids where the trained answer starts.
"""
from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

from mlan.errors import UserError
from mlan.piece_encoding import PieceEncoder, lay_out
from mlan.sources.records import Conversation, Image, ImageRef, Message, RecordError, Text
from mlan.templates import Piece, Template, check_conversation, get_template

if TYPE_CHECKING:
    from mlan.eval.loading import Loaded
    from mlan.eval.tasks import Item

_ANSWER = Message("assistant", (Text("answer"),))  # stands for the answer: only what comes before it is kept
_IMAGE = Image(ImageRef(data=b""))  # a slot; templates never read the image


def chat_template(tokenizer, image_token: str | None) -> Template | None:
    """The template a model folder's tokenizer was trained with (see the module docstring); None: no chat format."""
    for name in ("llama3", "tokenizer"):
        try:
            return get_template(name, tokenizer, image_token)
        except ValueError:  # the tokenizer lacks the template's tokens / has no chat_template
            continue
    return None


def before_answer(pieces: list[Piece]) -> list[Piece]:
    """The pieces before the first trained one: the conversation so far and the assistant's generation header."""
    first = next(k for k, p in enumerate(pieces) if p.trained)
    return pieces[:first]


class PromptRenderer:
    """User text (+ images first, as mlan renders LLaVA-style data) → the prompt ids of one model."""

    def __init__(self, tokenizer, image_token_id: int | None, image_tokens: int):
        self.tokenizer = tokenizer
        self.image_token_id = image_token_id
        self.image_tokens = image_tokens  # in-sequence positions per image
        image_token = tokenizer.convert_ids_to_tokens(image_token_id) if image_token_id is not None else None
        self.template = chat_template(tokenizer, image_token)
        self.encoder = PieceEncoder(tokenizer)

    def ids(self, text: str, n_images: int = 0) -> list[int]:
        """The user turn and the assistant header, as the build renders them ahead of a trained answer."""
        if n_images and self.image_token_id is None:
            raise UserError(f"{self.tokenizer.name_or_path}: a text-only model cannot be evaluated on image tasks")
        image_run = [self.image_token_id] * self.image_tokens if n_images else []
        text = text.strip()
        if self.template is None:  # a base model: BOS, the images, the text on its own line
            bos = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
            body = self.tokenizer.encode(("\n" if n_images else "") + text + "\n", add_special_tokens=False)
            return bos + image_run * n_images + body
        parts = (_IMAGE,) * n_images + (Text(("\n" + text) if n_images else text),)
        conv = Conversation("eval:0:0", "eval", (Message("user", parts), _ANSWER))
        try:
            pieces = before_answer(self.template.pieces(conv))
        except (ValueError, RecordError) as err:  # e.g. a hub model's chat_template that is not prefix-stable
            raise UserError(f"{self.tokenizer.name_or_path}: cannot render an eval prompt: {err}") from None
        return lay_out(pieces, self.encoder.encode([pieces])[0], image_run).ids

    def conversation_ids(self, conv: Conversation) -> list[int]:
        """A training conversation's ids up to its first trained token: the prompt the build trained after."""
        if conv.images and self.image_token_id is None:
            raise UserError(f"{self.tokenizer.name_or_path}: a text-only model cannot be evaluated on image tasks")
        if self.template is None:
            raise UserError(f"{self.tokenizer.name_or_path}: the tokenizer has no chat format, so it cannot take "
                            f"the prompt of training source {conv.source!r}")
        try:
            check_conversation(conv)
            pieces = before_answer(self.template.pieces(conv))
        except (ValueError, RecordError) as err:
            raise UserError(f"{self.tokenizer.name_or_path}: cannot render an eval prompt: {err}") from None
        image_run = [self.image_token_id] * self.image_tokens if conv.images else []
        return lay_out(pieces, self.encoder.encode([pieces])[0], image_run).ids


@lru_cache(maxsize=8)
def prompt_renderer(tokenizer, image_token_id: int | None, image_tokens: int) -> PromptRenderer:
    """One renderer per loaded model (building one tokenizes the template's fixed parts)."""
    return PromptRenderer(tokenizer, image_token_id, image_tokens)


def _renderer_of(lm: Loaded) -> PromptRenderer:
    """The prompt renderer of a loaded model (a text-only model has no image token)."""
    geometry = lm.geometry
    return prompt_renderer(lm.tokenizer, geometry.image_token_id if geometry else None,
                           geometry.image_tokens if geometry else 0)


def prompt_ids(lm: Loaded, text: str, n_images: int = 0) -> list[int]:
    """The user turn and the assistant header, tokenized as the build renders a document for this model."""
    return _renderer_of(lm).ids(text, n_images)


def item_prompt_ids(lm: Loaded, item: Item) -> list[int]:
    """An item's prompt ids: its training source's rendering when the task names one, else its user text."""
    if item.conversation is not None:
        return _renderer_of(lm).conversation_ids(item.conversation)
    return prompt_ids(lm, item.prompt, 1 if item.image else 0)
