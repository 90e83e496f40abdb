"""Instruction formats → `Conversation`: alpaca, sharegpt, llava, messages, prompt_completion, template.

Each format only says where a record keeps its turns; placeholder filling, image resolution and the
checks every conversation must pass (roles, an assistant turn, no empty assistant turn) are shared.
Anything wrong with one record is a `RecordError` naming the file, the record index and the field.
"""
from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from mlan.recipe import SourceSpec, TemplateSpec
from mlan.sources.images import ImageContext, image_root, to_image_ref
from mlan.sources.records import Conversation, Image, ImageRef, Message, RecordError, Text

IMAGE_PLACEHOLDER = "<image>"

# every role spelling the common formats use → the three roles of a Conversation
ROLE_ALIASES: dict[str, str] = {
    "system": "system", "developer": "system",
    "user": "user", "human": "user",
    "assistant": "assistant", "gpt": "assistant", "chatgpt": "assistant", "model": "assistant",
    "bard": "assistant", "bing": "assistant",
}


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
class _Slot:
    """An image placeholder waiting for the record's next image."""


_SLOT = _Slot()
_DraftPart = Any  # str | Image | _Slot
_PLACEHOLDER_SPLIT = re.compile(f"({re.escape(IMAGE_PLACEHOLDER)})")


@dataclass
class _Turn:
    role: str
    parts: list  # str | Image | _Slot
    field: str  # where the turn lives in the record (for errors)


class _Ctx:
    """One record being converted: where it came from, for errors and image resolution."""

    def __init__(self, spec: SourceSpec, index: int, record: dict, file: str):
        self.spec, self.index, self.record, self.file = spec, index, record, file
        self.images = ImageContext(root=image_root(spec), rewrite=spec.image_path, file=file, index=index)

    def error(self, reason: str, field: str | None = None) -> RecordError:
        return RecordError(self.file, self.index, reason, field)

    def require(self, obj: dict, key: str, field: str, types: type | tuple = str) -> Any:
        if not isinstance(obj, dict) or key not in obj or obj[key] is None:
            return self._missing(field)
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

    def _missing(self, field: str):
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
            out.extend(_SLOT if piece == IMAGE_PLACEHOLDER else piece for piece in _PLACEHOLDER_SPLIT.split(part) if piece)
        else:
            out.append(part)
    return out


def _finish(ctx: _Ctx, turns: list[_Turn], images: list[tuple[Any, str]], meta: dict | None = None,
            canonical: str | None = None) -> Conversation:
    """Checks every conversation must pass, then placeholders filled with the resolved images."""
    if not turns:
        raise ctx.error("no turns", None)
    for i, turn in enumerate(turns):
        if turn.role == "system" and i != 0:
            raise ctx.error("a system message may only be the first turn", turn.field)
    assistants = [t for t in turns if t.role == "assistant"]
    if not assistants:
        raise ctx.error("no assistant turn", None)
    for turn in assistants:
        if not any((isinstance(p, str) and p.strip()) or isinstance(p, Image) for p in turn.parts):
            raise ctx.error("empty assistant turn", turn.field)

    if ctx.spec.modality == "text":  # the mixture counts a text source's documents on the text side
        inline = next((t.field for t in turns for p in t.parts if isinstance(p, (Image, _Slot))), None)
        if images or inline:
            raise ctx.error("the record has images but the source has modality: text (use image_text)",
                            images[0][1] if images else inline)

    # `<image>` in text is a placeholder when the record has images or the source is image-text;
    # a text source may talk about the literal string "<image>".
    if images or ctx.spec.modality == "image_text" or any(isinstance(p, _Slot) for t in turns for p in t.parts):
        for turn in turns:
            turn.parts = _split_placeholders(turn.parts)
    n_slots = sum(isinstance(p, _Slot) for t in turns for p in t.parts)
    if n_slots == 0 and images:  # LLaVA: an image without a placeholder opens the first user turn
        first_user = next((t for t in turns if t.role == "user"), None)
        if first_user is None:
            raise ctx.error("the record has images but no user turn to put them in", images[0][1])
        first_user.parts[:0] = [_SLOT] * len(images)
        n_slots = len(images)
    if n_slots != len(images):
        raise ctx.error(f"{n_slots} {IMAGE_PLACEHOLDER} placeholder(s) but {len(images)} image(s)",
                        "images" if images else None)

    refs: Iterable[ImageRef] = iter([to_image_ref(value, ctx.images, field) for value, field in images])
    messages = []
    for turn in turns:
        parts: list = []
        for p in turn.parts:
            if isinstance(p, _Slot):
                parts.append(Image(next(refs)))
            elif isinstance(p, str):
                if p:
                    parts.append(Text(p))
            else:
                parts.append(p)
        messages.append(Message(role=turn.role, parts=tuple(parts)))  # type: ignore[arg-type]
    canonical = canonical if canonical is not None else canonical_json(ctx.record)
    return Conversation(
        id=record_id(ctx.spec.name, ctx.index, canonical),
        source=ctx.spec.name,
        messages=tuple(messages),
        meta={"file": ctx.file, "index": ctx.index, **(meta or {})},
    )


# ---------------------------------------------------------------- formats
def _system_turn(ctx: _Ctx) -> list[_Turn]:
    system = ctx.optional_str(ctx.record, "system", "system")
    return [_Turn("system", [system], "system")] if system else []


def _alpaca(ctx: _Ctx) -> Conversation:
    rec = ctx.record
    instruction = ctx.require(rec, "instruction", "instruction")
    extra = ctx.optional_str(rec, "input", "input") or ""
    output = ctx.require(rec, "output", "output")
    turns = _system_turn(ctx)
    history = rec.get("history") or []
    if not isinstance(history, list):
        raise ctx.error(f"expected a list of [user, assistant] pairs, got {type(history).__name__}", "history")
    for i, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise ctx.error("expected a [user, assistant] pair of strings", f"history[{i}]")
        turns += [_Turn("user", [pair[0]], f"history[{i}][0]"), _Turn("assistant", [pair[1]], f"history[{i}][1]")]
    turns.append(_Turn("user", ["\n".join(x for x in (instruction, extra) if x)], "instruction"))
    turns.append(_Turn("assistant", [output], "output"))
    return _finish(ctx, turns, ctx.record_images())


def _sharegpt(ctx: _Ctx) -> Conversation:
    rec = ctx.record
    key = "conversations" if "conversations" in rec or "messages" not in rec else "messages"
    convs = ctx.require(rec, key, key, list)
    turns = _system_turn(ctx)
    for i, item in enumerate(convs):
        where = f"{key}[{i}]"
        if not isinstance(item, dict):
            raise ctx.error(f"expected an object with from/value, got {type(item).__name__}", where)
        role_key = "from" if "from" in item or "role" not in item else "role"
        value_key = "value" if "value" in item or "content" not in item else "content"
        role = ctx.role(ctx.require(item, role_key, f"{where}.{role_key}"), f"{where}.{role_key}")
        value = item.get(value_key)
        if value is None and role != "assistant":
            ctx._missing(f"{where}.{value_key}")
        if value is not None and not isinstance(value, str):
            raise ctx.error(f"expected str, got {type(value).__name__}", f"{where}.{value_key}")
        turns.append(_Turn(role, [value or ""], f"{where}.{value_key}"))
    return _finish(ctx, turns, ctx.record_images())


def _content_parts(ctx: _Ctx, content: Any, where: str) -> list:
    """OpenAI-style content: a string, or a list of text / image_url / image parts."""
    if content is None:
        return []
    if isinstance(content, str):
        return [content]
    if isinstance(content, dict):
        content = [content]
    if not isinstance(content, list):
        raise ctx.error(f"expected a string or a list of parts, got {type(content).__name__}", where)
    parts: list = []
    for j, part in enumerate(content):
        pw = f"{where}[{j}]"
        if isinstance(part, str):
            parts.append(part)
            continue
        if not isinstance(part, dict):
            raise ctx.error(f"expected a content part object, got {type(part).__name__}", pw)
        kind = part.get("type") or ("text" if "text" in part else "image_url" if "image_url" in part else "image" if "image" in part else None)
        if kind in ("text", "input_text", "output_text"):
            parts.append(ctx.require(part, "text", f"{pw}.text"))
        elif kind in ("image_url", "input_image"):
            url = part.get("image_url")
            url_field = f"{pw}.image_url"
            if isinstance(url, dict):
                url, url_field = url.get("url"), f"{url_field}.url"
            if not isinstance(url, str) or not url:
                ctx._missing(url_field)
            parts.append(Image(to_image_ref(url, ctx.images, url_field)))
        elif kind == "image":
            payload = part.get("image", part.get("url", part.get("path")))
            # a bare {"type": "image"} (processor chat-template style) takes the record's next image
            parts.append(_SLOT if payload is None else Image(to_image_ref(payload, ctx.images, f"{pw}.image")))
        else:
            raise ctx.error(f"unknown content part type {kind!r}; allowed: text, image_url, image", f"{pw}.type")
    return parts


def _message_turns(ctx: _Ctx, messages: Any, key: str) -> list[_Turn]:
    if not isinstance(messages, list):
        raise ctx.error(f"expected a list of messages, got {type(messages).__name__}", key)
    turns = []
    for i, msg in enumerate(messages):
        where = f"{key}[{i}]"
        if not isinstance(msg, dict):
            raise ctx.error(f"expected an object with role/content, got {type(msg).__name__}", where)
        role = ctx.role(ctx.require(msg, "role", f"{where}.role"), f"{where}.role")
        if "content" not in msg and role != "assistant":
            ctx._missing(f"{where}.content")
        turns.append(_Turn(role, _content_parts(ctx, msg.get("content"), f"{where}.content"), f"{where}.content"))
    return turns


def _messages(ctx: _Ctx) -> Conversation:
    turns = _system_turn(ctx) + _message_turns(ctx, ctx.require(ctx.record, "messages", "messages", list), "messages")
    return _finish(ctx, turns, ctx.record_images())


def _prompt_completion(ctx: _Ctx) -> Conversation:
    rec = ctx.record
    turns = _system_turn(ctx)
    for key, role in (("prompt", "user"), ("completion", "assistant")):
        value = ctx.require(rec, key, key, (str, list))
        turns += [_Turn(role, [value], key)] if isinstance(value, str) else _message_turns(ctx, value, key)
    return _finish(ctx, turns, ctx.record_images())


# ---------------------------------------------------------------- template
class _Fields(dict):
    """A record for str.format_map: a missing or null field names itself."""

    def __getitem__(self, key: str) -> Any:
        if not dict.__contains__(self, key) or dict.__getitem__(self, key) is None:
            raise _MissingField(key)
        return dict.__getitem__(self, key)


class _MissingField(KeyError):
    pass


@lru_cache(maxsize=64)
def _jinja(text: str):
    import jinja2

    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)
    return env.from_string(text)


_UNDEFINED = re.compile(r"'([^']+)' is undefined|has no attribute '([^']+)'")


def _render(ctx: _Ctx, template: TemplateSpec, text: str, what: str) -> str:
    if template.engine == "jinja":
        import jinja2

        try:
            return _jinja(text).render(**ctx.record)
        except jinja2.UndefinedError as err:
            m = _UNDEFINED.search(str(err))
            name = (m.group(1) or m.group(2)) if m else None
            raise ctx.error(f"template {what} needs field {name or str(err)!r}, missing from the record", name) from None
        except jinja2.TemplateError as err:
            raise ctx.error(f"template {what} {text!r}: {err}", None) from None
    try:
        return text.format_map(_Fields(ctx.record))
    except _MissingField as err:
        name = err.args[0]
        why = "null in" if name in ctx.record else "missing from"
        raise ctx.error(f"template {what} needs field {name!r}, {why} the record", name) from None
    except (KeyError, IndexError, AttributeError, ValueError, TypeError) as err:
        raise ctx.error(f"template {what} {text!r} cannot be filled: {type(err).__name__}: {err}", None) from None


def _template(ctx: _Ctx) -> Conversation:
    template = ctx.spec.template
    assert template is not None  # SourceSpec's validator guarantees it
    canonical = canonical_json(ctx.record)
    k = choose_prompt(canonical, template.seed, len(template.prompts))
    turns = []
    if template.system:
        turns.append(_Turn("system", [_render(ctx, template, template.system, "system")], "template.system"))
    turns.append(_Turn("user", [_render(ctx, template, template.prompts[k], f"prompts[{k}]")], f"template.prompts[{k}]"))
    turns.append(_Turn("assistant", [_render(ctx, template, template.response, "response")], "template.response"))
    if template.image:
        images = [(_render(ctx, template, template.image, "image"), "template.image")]
    else:
        images = ctx.record_images()
    return _finish(ctx, turns, images, meta={"prompt": k}, canonical=canonical)


FORMATS: dict[str, Callable[[_Ctx], Conversation]] = {
    "alpaca": _alpaca,
    "sharegpt": _sharegpt,
    "llava": _sharegpt,  # ShareGPT turns + `image` / `images`; the image handling is shared
    "messages": _messages,
    "prompt_completion": _prompt_completion,
    "template": _template,
}


def to_conversation(spec: SourceSpec, index: int, record: dict, file: str) -> Conversation:
    """One raw record → a checked Conversation, or a RecordError naming file, index, reason and field."""
    if not isinstance(record, dict):
        raise RecordError(file, index, f"expected a JSON object, got {type(record).__name__}")
    return FORMATS[spec.format](_Ctx(spec, index, record, file))
