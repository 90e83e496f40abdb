"""What every instruction format shares: a record's identity (canonical JSON, id, prompt choice), the draft
turns a format reads out of a record, and `finish`, the checks every conversation must pass (roles and their
order, a trained assistant turn, no empty assistant turn, no video) with placeholders filled by the record's
images. Anything wrong with one record is a `RecordError` naming the file, the record index and the field.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, NoReturn

from mlan.recipe import SourceSpec
from mlan.sources.images import ImageContext, image_root, to_image_ref
from mlan.sources.records import Conversation, Image, ImageRef, Message, RecordError, Text, ToolCall

IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"
VIDEO_UNSUPPORTED = "video input is not supported"
AUDIO_UNSUPPORTED = "audio input is not supported"

# every role spelling the common formats use → the three roles of a Conversation
ROLE_ALIASES: dict[str, str] = {
    "system": "system", "developer": "system",
    "user": "user", "human": "user",
    "assistant": "assistant", "gpt": "assistant", "chatgpt": "assistant", "model": "assistant",
    "bard": "assistant", "bing": "assistant",
    # tool outputs: OpenAI `tool` (and the older `function`), ShareGPT `observation`, Llama-3.1 `ipython`
    "tool": "tool", "function": "tool", "observation": "tool", "ipython": "tool",
}
# ShareGPT's `from: function_call`: an assistant turn whose value is the JSON of one call or a list of calls
FUNCTION_CALL_ROLE = "function_call"


# ---------------------------------------------------------------- record identity
def _json_default(obj: Any) -> Any:
    """Non-JSON values in a record (image bytes, PIL images, dates) hash by content."""
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return "bytes:sha256:" + hashlib.sha256(bytes(obj)).hexdigest()
    if hasattr(obj, "tobytes") and hasattr(obj, "mode"):  # PIL image
        return f"pil:{obj.mode}:{obj.size}:" + hashlib.sha256(obj.tobytes()).hexdigest()
    if hasattr(obj, "isoformat"):
        return obj.isoformat()
    if hasattr(obj, "tolist"):  # numpy scalars / arrays
        return obj.tolist()
    return str(obj)


def canonical_json(record: Any) -> str:
    """One spelling per record content: sorted keys, no whitespace, UTF-8 kept."""
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_json_default)


def record_id(source: str, index: int, canonical: str) -> str:
    """Stable document id: source name + record index + content hash (design.md's doc_id)."""
    return f"{source}:{index}:{hashlib.sha256(canonical.encode('utf-8')).hexdigest()[:12]}"


def choose_prompt(canonical: str, seed: int, n: int) -> int:
    """Which paraphrase a record gets: a seeded hash of its content, so every run and worker agrees."""
    digest = hashlib.sha256(canonical.encode("utf-8") + f"#seed={seed}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % n


# ---------------------------------------------------------------- draft conversation
@dataclass(frozen=True)
class Slot:
    """An image placeholder waiting for the record's next image."""


SLOT = Slot()
DraftPart = Any  # str | Image | Slot
_PLACEHOLDER_SPLIT = re.compile(f"({re.escape(IMAGE_PLACEHOLDER)})")


@dataclass
class Turn:
    """One turn as a format reads it, before the shared checks and the image placeholders are resolved."""

    role: str
    parts: list  # str | Image | ToolCall | Slot
    field: str  # where the turn lives in the record (for errors)
    trained: bool = True  # False: `loss_weight: 0`


class RecordContext:
    """One record being converted: where it came from, for errors and image resolution."""

    def __init__(self, spec: SourceSpec, index: int, record: dict, file: str):
        self.spec, self.index, self.record, self.file = spec, index, record, file
        self.images = ImageContext(root=image_root(spec), rewrite=spec.image_path, file=file, index=index)

    def error(self, reason: str, field: str | None = None) -> RecordError:
        return RecordError(self.file, self.index, reason, field)

    def require(self, obj: dict, key: str, field: str, types: type | tuple = str) -> Any:
        if not isinstance(obj, dict) or key not in obj or obj[key] is None:
            self.missing(field)
        value = obj[key]
        if not isinstance(value, types):
            names = types.__name__ if isinstance(types, type) else " or ".join(t.__name__ for t in types)
            raise self.error(f"expected {names}, got {type(value).__name__}", field)
        return value

    def optional_str(self, obj: dict, key: str, field: str) -> str | None:
        value = obj.get(key)
        if value is None:
            return None
        if not isinstance(value, str):
            raise self.error(f"expected str, got {type(value).__name__}", field)
        return value

    def missing(self, field: str) -> NoReturn:
        """Raise: the field is absent (or null)."""
        raise self.error("missing field", field)

    def role(self, value: Any, field: str) -> str:
        role = ROLE_ALIASES.get(value.lower()) if isinstance(value, str) else None
        if role is None:
            raise self.error(f"unknown role {value!r}; allowed: {', '.join(sorted(ROLE_ALIASES))}", field)
        return role

    def record_images(self) -> list[tuple[Any, str]]:
        """The record's `images` (list or one) or `image` field, as (value, field path) pairs."""
        for key in ("images", "image"):
            value = self.record.get(key)
            if value is None or value == "" or value == []:
                continue
            if isinstance(value, (list, tuple)):
                return [(v, f"{key}[{i}]") for i, v in enumerate(value)]
            return [(value, key)]
        return []


def _split_placeholders(parts: list) -> list:
    out: list = []
    for part in parts:
        if isinstance(part, str) and IMAGE_PLACEHOLDER in part:
            out.extend(SLOT if piece == IMAGE_PLACEHOLDER else piece for piece in _PLACEHOLDER_SPLIT.split(part) if piece)
        else:
            out.append(part)
    return out


def _check_no_video(ctx: RecordContext, turns: list[Turn], images: list) -> None:
    """Video and audio have no place in a document; a `<video>` left in the prompt would be trained on as text.

    As with `<image>`, a text source whose record has no media may talk about a literal "<video>" (HTML).
    """
    for key, reason in (("videos", VIDEO_UNSUPPORTED), ("video", VIDEO_UNSUPPORTED),
                        ("audios", AUDIO_UNSUPPORTED), ("audio", AUDIO_UNSUPPORTED)):
        if ctx.record.get(key) not in (None, "", []):
            raise ctx.error(reason, key)
    if ctx.spec.modality == "text" and not images:
        return
    for turn in turns:
        if any(isinstance(p, str) and VIDEO_PLACEHOLDER in p for p in turn.parts):
            raise ctx.error(f"{VIDEO_UNSUPPORTED} ({VIDEO_PLACEHOLDER} in the text)", turn.field)


def _check_order(ctx: RecordContext, turns: list[Turn]) -> None:
    """Roles in an order every chat template can render and that trains something."""
    if not turns:
        raise ctx.error("no turns", None)
    for i, turn in enumerate(turns):
        if turn.role == "system" and i != 0:
            raise ctx.error("a system message may only be the first turn", turn.field)
    first = next((t for t in turns if t.role != "system"), None)
    if first is None:
        raise ctx.error("no assistant turn", None)
    if first.role != "user":
        raise ctx.error(f"the first turn after the system message must be the user's, got {first.role}", first.field)
    for prev, turn in itertools.pairwise(turns):
        if turn.role == "tool" and not (prev.role == "tool" or any(isinstance(p, ToolCall) for p in prev.parts)):
            raise ctx.error("a tool output must follow an assistant turn with tool calls (or another tool output)",
                            turn.field)
    assistants = [t for t in turns if t.role == "assistant"]
    if not assistants:
        raise ctx.error("no assistant turn", None)
    for turn in assistants:
        if not any((isinstance(p, str) and p.strip()) or isinstance(p, (Image, ToolCall)) for p in turn.parts):
            raise ctx.error("empty assistant turn", turn.field)
    if not any(t.trained for t in assistants):
        raise ctx.error("no trained assistant turn (every assistant message has loss_weight 0)", None)


def finish(ctx: RecordContext, turns: list[Turn], images: list[tuple[Any, str]], meta: dict | None = None,
            canonical: str | None = None, tools: tuple[str, ...] = (), notes: tuple[str, ...] = (),
            id_suffix: str = "") -> Conversation:
    """Checks every conversation must pass, then placeholders filled with the resolved images."""
    _check_no_video(ctx, turns, images)
    _check_order(ctx, turns)
    calls = next((t.field for t in turns if any(isinstance(p, ToolCall) for p in t.parts)), None)
    if calls and not tools:
        raise ctx.error("the record has tool calls but no `tools` schemas: the model would learn to call "
                        "functions it was never shown", calls)

    if ctx.spec.modality == "text":  # the mixture counts a text source's documents on the text side
        inline = next((t.field for t in turns for p in t.parts if isinstance(p, (Image, Slot))), None)
        if images or inline:
            raise ctx.error("the record has images but the source has modality: text (use image_text)",
                            images[0][1] if images else inline)

    # `<image>` in text is a placeholder when the record has images or the source is image-text;
    # a text source may talk about the literal string "<image>".
    if images or ctx.spec.modality == "image_text" or any(isinstance(p, Slot) for t in turns for p in t.parts):
        for turn in turns:
            turn.parts = _split_placeholders(turn.parts)
    n_slots = sum(isinstance(p, Slot) for t in turns for p in t.parts)
    if n_slots == 0 and images:  # LLaVA: an image without a placeholder opens the first user turn
        first_user = next(t for t in turns if t.role == "user")  # _check_order: there is one
        first_user.parts[:0] = [SLOT] * len(images)
        n_slots = len(images)
    if n_slots != len(images):
        raise ctx.error(f"{n_slots} {IMAGE_PLACEHOLDER} placeholder(s) but {len(images)} image(s)",
                        "images" if images else None)

    refs: Iterable[ImageRef] = iter([to_image_ref(value, ctx.images, field) for value, field in images])
    messages = []
    for turn in turns:
        parts: list = []
        for p in turn.parts:
            if isinstance(p, Slot):
                parts.append(Image(next(refs)))
            elif isinstance(p, str):
                if p:
                    parts.append(Text(p))
            else:
                parts.append(p)
        messages.append(Message(role=turn.role, parts=tuple(parts), trained=turn.trained))  # type: ignore[arg-type]
    canonical = canonical if canonical is not None else canonical_json(ctx.record)
    return Conversation(
        id=record_id(ctx.spec.name, ctx.index, canonical) + id_suffix,
        source=ctx.spec.name,
        messages=tuple(messages),
        meta={"file": ctx.file, "index": ctx.index, **(meta or {})},
        tools=tools,
        notes=notes,
    )



def system_turn(ctx: RecordContext) -> list[Turn]:
    system = ctx.optional_str(ctx.record, "system", "system")
    return [Turn("system", [system], "system")] if system else []


def _is_tree(record: dict) -> bool:
    prompt = record.get("prompt")
    return isinstance(prompt, dict) and ("replies" in prompt or "text" in prompt)


def require_turns(ctx: RecordContext, key: str) -> list:
    """The record's list of turns; an OpenAssistant tree gets a reason that says what it is."""
    if key not in ctx.record and _is_tree(ctx.record):
        raise ctx.error(f"missing field {key!r}: the record is a message tree (`prompt` with nested `replies`, "
                        "OpenAssistant's layout); use format: oasst", key)
    return ctx.require(ctx.record, key, key, list)
