"""Template pieces → token ids: every text piece of a batch in one tokenizer call, laid end to end.

Shared by the build's renderer and eval's prompts, so a prompt is tokenized exactly as training saw it.
User text never has special-token strings parsed (a "<|eot_id|>" typed by a user stays text); template
text (`Piece.special`) does.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tokenizers import Tokenizer

from mlan.templates import Piece
from mlan.tokenizer import is_offline_llama3, llama3_tiktoken

TIKTOKEN_MAX_CHARS = 20_000  # longer texts go to the Rust tokenizer (tiktoken is slow on very long pieces)


def plain_backend(tok) -> Tokenizer:
    """A copy of the Rust tokenizer that treats special-token strings in text as ordinary text.

    User data that happens to contain "<|eot_id|>" must not become a real end-of-turn token.
    """
    backend = getattr(tok, "_mlan_plain_backend", None)
    if backend is None:
        backend = Tokenizer.from_str(tok.backend_tokenizer.to_str())
        backend.encode_special_tokens = True
        try:
            tok._mlan_plain_backend = backend
        except AttributeError:
            pass
    return backend


def encode_texts(backend, texts: list[str]) -> list[list[int]]:
    """Ids of each text with the Rust tokenizer `backend`, no special tokens added, one batch call."""
    if not texts:
        return []
    encode = getattr(backend, "encode_batch_fast", None) or backend.encode_batch  # fast: no offsets
    return [e.ids for e in encode(texts, add_special_tokens=False)]


def _encode_plain_tiktoken(enc, backend: Callable[[], Any], texts: list[str]) -> list[list[int]]:
    """Ordinary text (no special-token parsing) with tiktoken; the rare very long text with `backend()`.

    `backend` is a callable so the Rust copy (≈0.4 s to build) is made only when a long text needs it.
    """
    out: list[list[int] | None] = [enc.encode_ordinary(t) if len(t) <= TIKTOKEN_MAX_CHARS else None for t in texts]
    long_ = [i for i, ids in enumerate(out) if ids is None]
    if not long_:
        return out  # type: ignore[return-value]
    for i, ids in zip(long_, encode_texts(backend(), [texts[i] for i in long_])):
        out[i] = ids
    return out  # type: ignore[return-value]


class PieceEncoder:
    """Token ids of the text pieces of many documents, for one tokenizer."""

    def __init__(self, tokenizer, fast_bpe: bool = True):
        """fast_bpe: with the offline llama3 tokenizer, encode user/assistant text with tiktoken (same ids)."""
        self.tokenizer = tokenizer
        self._special = tokenizer.backend_tokenizer
        self._tiktoken = llama3_tiktoken() if fast_bpe and is_offline_llama3(tokenizer) else None

    @property
    def _plain(self) -> Tokenizer:
        return plain_backend(self.tokenizer)  # built on first use, then kept on the tokenizer

    def encode(self, docs: list[list[Piece]]) -> list[list]:
        """Token ids of every text piece of every document (None for other pieces), in one tokenizer call each."""
        plain_texts = [p.text for ps in docs for p in ps if p.kind == "text" and not p.special]
        special_texts = [p.text for ps in docs for p in ps if p.kind == "text" and p.special]
        if self._tiktoken is not None:
            plain = iter(_encode_plain_tiktoken(self._tiktoken, lambda: self._plain, plain_texts))
        else:
            plain = iter(encode_texts(self._plain, plain_texts))
        special = iter(encode_texts(self._special, special_texts))
        return [[next(special if p.special else plain) if p.kind == "text" else None for p in ps] for ps in docs]


@dataclass
class Layout:
    """A document's pieces laid end to end: ids, and per piece its length and whether it is trained."""

    ids: list[int]
    lengths: list[int]
    trained: list[bool]
    image_positions: list[int]  # index of each image's first token
    cuts: list[int]  # token counts at which a complete assistant turn ends (truncation points)


def lay_out(pieces: list[Piece], encoded: list, image_run: list[int]) -> Layout:
    """Text pieces become their ids, id pieces their ids, image slots `image_run` (the family's image tokens)."""
    # one Python list per document (not an array per piece): this loop runs for every document of every build
    out = Layout([], [], [], [], [])
    ids = out.ids
    for p, encoded_ids in zip(pieces, encoded):
        if p.kind == "text":
            seg = encoded_ids
        elif p.kind == "ids":
            seg = p.ids
        else:
            out.image_positions.append(len(ids))
            seg = image_run
        ids.extend(seg)
        out.lengths.append(len(seg))
        out.trained.append(p.trained and p.kind != "image")
        if p.turn_end:
            out.cuts.append(len(ids))
    return out
