"""Conversation → token ids, exact loss mask, image slots and the token counts of design.md.

The template (mlan/templates.py) cuts a conversation into pieces; this module tokenizes every text piece
of a batch of documents in one call of the Rust tokenizer, lays the pieces end to end with their mask
bits, expands image slots to the family's in-sequence image tokens, applies the overlong policy and
reads each kept image's size (for Mllama's tile count) and bytes.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from mlan.families.registry import get_family
from mlan.piece_encoding import PieceEncoder, encode_texts, lay_out
from mlan.recipe import ModelSpec
from mlan.sources import iter_source, to_conversations
from mlan.sources.images import DEFAULT_LIMITS, ImageLimits, probe_image
from mlan.sources.records import Conversation, ImageRef, Message, RecordError, Text
from mlan.templates import check_conversation, get_template

OVERLONG = ("truncate", "drop")


class DocumentDropped(Exception):
    """A valid record that the overlong policy (`mixture.overlong: drop`) leaves out; counted, not rejected."""

    def __init__(self, reason: str, doc_id: str = "", source: str = ""):
        self.reason, self.doc_id, self.source = reason, doc_id, source
        super().__init__(f"{doc_id}: {reason}" if doc_id else reason)


@dataclass
class Document:
    """One tokenized document (a cache row). Counts follow design.md's token accounting."""

    doc_id: str  # stable: source name + record index + content hash
    source: str
    modality: str  # "text" | "image_text"
    input_ids: np.ndarray  # uint32 (n_tokens,)
    loss_mask: np.ndarray  # uint8 (n_tokens,): 1 on assistant content + its end-of-turn token
    image_positions: list[int] = field(default_factory=list)  # index of each image's first token
    images: list[bytes] = field(default_factory=list)  # encoded image bytes, in order of appearance
    image_exts: list[str] = field(default_factory=list)  # "jpg", "png", …
    image_sizes: list[tuple[int, int]] = field(default_factory=list)  # (width, height) per image
    n_image_tokens: int = 0  # in-sequence image positions (llava: N per image; mllama: 1 per image)
    n_tiles: int = 0  # mllama: tiles over all images; llava: images
    n_vision_tokens: int = 0  # encoder-side positions, reported, never budgeted
    truncated: bool = False
    image_tiles: list[int] = field(default_factory=list)  # tiles per image (mllama; 1 each for llava)

    @property
    def n_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def n_loss_tokens(self) -> int:
        return int(self.loss_mask.sum())

    @property
    def n_images(self) -> int:
        return len(self.images)

    def to_json(self) -> dict:
        """The `mlan render --json` object (ids and mask as plain lists)."""
        return {
            "doc_id": self.doc_id,
            "source": self.source,
            "modality": self.modality,
            "input_ids": self.input_ids.tolist(),
            "loss_mask": self.loss_mask.tolist(),
            "image_positions": self.image_positions,
            "image_sizes": [list(s) for s in self.image_sizes],
            "image_exts": self.image_exts,
            "image_tiles": self.image_tiles,
            "n_tokens": self.n_tokens,
            "n_loss_tokens": self.n_loss_tokens,
            "n_images": self.n_images,
            "n_image_tokens": self.n_image_tokens,
            "n_tiles": self.n_tiles,
            "n_vision_tokens": self.n_vision_tokens,
            "truncated": self.truncated,
        }


class Renderer:
    """Renders conversations for one model (family, tokenizer, template) and one seq_len / overlong policy."""

    def __init__(self, model: ModelSpec, seq_len: int, overlong: str = "truncate", tokenizer=None,
                 fast_bpe: bool = True, image_limits: ImageLimits = DEFAULT_LIMITS):
        """fast_bpe: with the offline llama3 tokenizer, encode user/assistant text with tiktoken (same ids);
        image_limits: the recipe's `mixture.max_image_*`, checked on every image this renderer reads."""
        if overlong not in OVERLONG:
            raise ValueError(f"overlong must be one of {', '.join(OVERLONG)}, got {overlong!r}")
        if seq_len < 1:
            raise ValueError(f"seq_len must be ≥ 1, got {seq_len}")
        self.family = get_family(model)
        if tokenizer is not None:
            self.family.tokenizer = tokenizer  # use the caller's (already loaded) tokenizer
        self.tokenizer = self.family.tokenizer
        self.seq_len = int(seq_len)
        self.overlong = overlong
        self.image_limits = image_limits
        self.template = get_template(self.family.template, self.tokenizer, self.family.image_token)
        self._encoder = PieceEncoder(self.tokenizer, fast_bpe)
        self._image_seq = self.family.image_seq_tokens()
        self._check_piece_boundaries()

    def _check_piece_boundaries(self) -> None:
        """Pieces tokenized apart must equal the whole rendered string tokenized at once, or masks would lie.

        True for byte-level BPE tokenizers (Llama-3, tiktoken-style); SentencePiece tokenizers that prepend
        a space to every encode call are not, and are refused here with a clear message.
        """
        probe = Conversation("probe:0:0", "probe", (
            Message("user", (Text("What's 12+30?\n\nAnswer  in words, please:"),)),
            Message("assistant", (Text("Forty-two.\n(42)"),)),
            Message("user", (Text("Again"),)),
            Message("assistant", (Text("42 !"),)),
        ))
        try:
            pieces = self.template.pieces(probe)
        except RecordError as err:
            raise ValueError(f"template {self.template.name!r} cannot render a plain two-turn chat: {err.reason}") from None
        encoded = self._encoder.encode([pieces])[0]
        ids = [i for p, e in zip(pieces, encoded) for i in (e if p.kind == "text" else p.ids)]
        whole = "".join(p.text if p.kind == "text" else self.tokenizer.decode(list(p.ids)) for p in pieces)
        if ids != encode_texts(self.tokenizer.backend_tokenizer, [whole])[0]:
            raise ValueError(
                f"tokenizer {self.tokenizer.name_or_path!r} does not split at the boundaries of template "
                f"{self.template.name!r} (tokenizing the pieces apart differs from tokenizing the whole text), "
                "so loss masks would be inexact; use a byte-level BPE tokenizer (Llama-3) with this template"
            )

    # ------------------------------------------------------------------ public
    def render(self, conv: Conversation) -> Document:
        """One conversation → Document; raises RecordError (bad record) or DocumentDropped (overlong)."""
        out = self.render_batch([conv])[0]
        if isinstance(out, Exception):
            raise out
        return out

    def render_batch(self, convs: Iterable[Conversation]) -> list[Document | RecordError | DocumentDropped]:
        """Many conversations with one tokenizer call; each result is a Document or the exception for it."""
        convs = list(convs)
        pieces: list = []
        for conv in convs:
            try:
                check_conversation(conv)
                pieces.append(self.template.pieces(conv))
            except RecordError as err:
                pieces.append(err)
        encoded = iter(self._encoder.encode([ps for ps in pieces if not isinstance(ps, RecordError)]))
        results: list[Document | RecordError | DocumentDropped] = []
        for conv, ps in zip(convs, pieces):
            if isinstance(ps, RecordError):
                results.append(ps)
                continue
            try:
                results.append(self._assemble(conv, ps, next(encoded)))
            except (RecordError, DocumentDropped) as err:
                results.append(err)
        return results

    # ------------------------------------------------------------------ internals
    def _assemble(self, conv: Conversation, pieces: list, encoded: list) -> Document:
        image_id = self.family.image_token_id if conv.images else -1
        laid = lay_out(pieces, encoded, [image_id] * self._image_seq)
        ids, image_positions, cuts = laid.ids, laid.image_positions, laid.cuts
        pos = len(ids)
        input_ids = np.array(ids, dtype=np.uint32)
        loss_mask = np.repeat(np.array(laid.trained, dtype=np.uint8), laid.lengths)
        n_images = len(conv.images)
        if len(image_positions) != n_images:
            raise self._error(conv, f"template placed {len(image_positions)} image(s) for {n_images}")

        truncated = False
        if pos > self.seq_len:
            if self.overlong == "drop":
                raise DocumentDropped(f"{pos} tokens > seq_len {self.seq_len}", conv.id, conv.source)
            fitting = [c for c in cuts if c <= self.seq_len]
            if not fitting:
                first = cuts[0] if cuts else pos
                raise DocumentDropped(
                    f"{pos} tokens > seq_len {self.seq_len} and the first assistant turn ends at token {first}",
                    conv.id, conv.source,
                )
            cut = fitting[-1]
            input_ids, loss_mask = input_ids[:cut], loss_mask[:cut]
            image_positions = [q for q in image_positions if q < cut]
            truncated = True
        if loss_mask.sum() == 0:  # cannot happen after check_conversation, kept as the invariant it is
            raise self._error(conv, "no trained token")

        doc = Document(
            doc_id=conv.id,
            source=conv.source,
            modality="image_text" if image_positions else "text",
            input_ids=input_ids,
            loss_mask=loss_mask,
            image_positions=image_positions,
            truncated=truncated,
        )
        for ref in conv.images[: len(image_positions)]:
            self._add_image(conv, doc, ref)
        doc.n_image_tokens = len(image_positions) * self._image_seq
        if image_id >= 0 and int(np.count_nonzero(input_ids == image_id)) != doc.n_image_tokens:
            raise self._error(conv, "the image token appears in the text itself")
        return doc

    def _add_image(self, conv: Conversation, doc: Document, ref: ImageRef) -> None:
        file, index = str(conv.meta.get("file", conv.source)), conv.meta.get("index")
        try:
            data = ref.read_bytes()
        except OSError as err:
            raise RecordError(file, index, f"cannot read image {ref.path}: {err}", "image") from None
        width, height, ext = probe_image(ImageRef(data=data), file, index, where=ref.path,
                                         limits=self.image_limits)
        if ext == "bin" and ref.path is not None:
            ext = ref.suffix
        tiles = self.family.tiles_for(width, height)
        doc.images.append(data)
        doc.image_exts.append(ext)
        doc.image_sizes.append((width, height))
        doc.image_tiles.append(tiles)
        doc.n_tiles += tiles
        doc.n_vision_tokens += self.family.vision_tokens_for(width, height)

    @staticmethod
    def _error(conv: Conversation, reason: str) -> RecordError:
        return RecordError(str(conv.meta.get("file", conv.source)), conv.meta.get("index"), reason)


# ---------------------------------------------------------------------- `mlan render`
def document_spans(doc: Document, tokenizer, image_token_id: int | None) -> list[tuple[str, bool]]:
    """(text, trained) runs of a document for display; image slots collapse to `<image ×N>`."""
    ids, mask = doc.input_ids, doc.loss_mask
    is_image = ids == image_token_id if image_token_id is not None else np.zeros(len(ids), bool)
    out: list[tuple[str, bool]] = []
    start, n = 0, len(ids)
    while start < n:
        end = start + 1
        while end < n and mask[end] == mask[start] and is_image[end] == is_image[start]:
            end += 1
        if is_image[start]:
            out.append((f"<image ×{end - start}>" if end - start > 1 else tokenizer.decode([int(ids[start])]), False))
        else:
            out.append((tokenizer.decode(ids[start:end].tolist(), skip_special_tokens=False), bool(mask[start])))
        start = end
    return out


def format_document(doc: Document, tokenizer, image_token_id: int | None) -> str:
    """The document's text with trained spans in [[…]]."""
    return "".join(f"[[{t}]]" if trained else t for t, trained in document_spans(doc, tokenizer, image_token_id))


def source_conversations(spec) -> Iterator[Conversation | RecordError]:
    """Every conversation of a source, each path of an OpenAssistant tree included (`tree_paths: all`)."""
    for file, index, record in iter_source(spec):
        if isinstance(record, RecordError):
            yield record
            continue
        try:
            yield from to_conversations(spec, index, record, file)
        except RecordError as err:
            yield err
