"""The chat formats, which keep their turns in the record: alpaca (instruction/input/output, history),
sharegpt and llava (from/value turns), messages (OpenAI role/content, content parts), prompt_completion."""
from __future__ import annotations

from typing import Any

from mlan.sources.formats.draft import (
    AUDIO_UNSUPPORTED,
    FUNCTION_CALL_ROLE,
    SLOT,
    VIDEO_UNSUPPORTED,
    RecordContext,
    Turn,
    finish,
    require_turns,
    system_turn,
)
from mlan.sources.formats.tools import loss_weight, tool_calls, tools_of
from mlan.sources.images import to_image_ref
from mlan.sources.records import Conversation, Image


def alpaca(ctx: RecordContext) -> Conversation:
    rec = ctx.record
    instruction = ctx.require(rec, "instruction", "instruction")
    extra = ctx.optional_str(rec, "input", "input") or ""
    output = ctx.require(rec, "output", "output")
    turns = system_turn(ctx)
    history = rec.get("history") or []
    if not isinstance(history, list):
        raise ctx.error(f"expected a list of [user, assistant] pairs, got {type(history).__name__}", "history")
    for i, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise ctx.error("expected a [user, assistant] pair of strings", f"history[{i}]")
        turns += [Turn("user", [pair[0]], f"history[{i}][0]"), Turn("assistant", [pair[1]], f"history[{i}][1]")]
    turns.append(Turn("user", ["\n".join(x for x in (instruction, extra) if x)], "instruction"))
    turns.append(Turn("assistant", [output], "output"))
    return finish(ctx, turns, ctx.record_images(), tools=tools_of(ctx))


def sharegpt(ctx: RecordContext) -> Conversation:
    rec = ctx.record
    key = "conversations" if "conversations" in rec or "messages" not in rec else "messages"
    convs = require_turns(ctx, key)
    turns = system_turn(ctx)
    for i, item in enumerate(convs):
        where = f"{key}[{i}]"
        if not isinstance(item, dict):
            raise ctx.error(f"expected an object with from/value, got {type(item).__name__}", where)
        role_key = "from" if "from" in item or "role" not in item else "role"
        value_key = "value" if "value" in item or "content" not in item else "content"
        tag = ctx.require(item, role_key, f"{where}.{role_key}")
        value = item.get(value_key)
        if value is None:
            raise ctx.error("missing field" if value_key not in item else "content is null", f"{where}.{value_key}")
        if isinstance(tag, str) and tag.lower() == FUNCTION_CALL_ROLE:
            calls = tool_calls(ctx, value, f"{where}.{value_key}")
            turns.append(Turn("assistant", calls, f"{where}.{value_key}", loss_weight(ctx, item, where)))
            continue
        role = ctx.role(tag, f"{where}.{role_key}")
        if not isinstance(value, str):
            raise ctx.error(f"expected str, got {type(value).__name__}", f"{where}.{value_key}")
        turns.append(Turn(role, [value], f"{where}.{value_key}", loss_weight(ctx, item, where)))
    return finish(ctx, turns, ctx.record_images(), tools=tools_of(ctx))


_TEXT_KINDS = ("text", "input_text", "output_text")
_IMAGE_URL_KINDS = ("image_url", "input_image")
_VIDEO_KINDS = ("video", "video_url", "input_video")
_AUDIO_KINDS = ("audio", "audio_url", "input_audio")
_PART_KINDS = "text, image_url, image, tool_call"


def _part_kind(part: dict) -> str | None:
    if part.get("type"):
        return part["type"]
    return next((k for k in ("text", "image_url", "image") if k in part), None)


def _content_parts(ctx: RecordContext, content: Any, where: str) -> list:
    """A string, or a list of parts: OpenAI's (`text`, `image_url`), LLaMA-Factory's (`value`), `image`, `tool_call`."""
    if content is None:
        raise ctx.error("content is null", where)
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
            raise ctx.error('a bare string in a list of parts; write {"type": "text", "text": …}', pw)
        if not isinstance(part, dict):
            raise ctx.error(f"expected a content part object, got {type(part).__name__}", pw)
        kind = _part_kind(part)
        # LLaMA-Factory keeps every part's payload under `value`; OpenAI under the part's type (or `text`,
        # `image_url` for the Responses API's input_text / input_image)
        own_key = "text" if kind in _TEXT_KINDS else "image_url" if kind in _IMAGE_URL_KINDS else kind
        value_key = own_key if own_key in part or "value" not in part else "value"
        if kind in _TEXT_KINDS:
            parts.append(ctx.require(part, value_key, f"{pw}.{value_key}"))
        elif kind in _IMAGE_URL_KINDS:
            url = part.get(value_key)
            url_field = f"{pw}.{value_key}"
            if isinstance(url, dict):
                url, url_field = url.get("url"), f"{url_field}.url"
            if not isinstance(url, str) or not url:
                ctx.missing(url_field)
            parts.append(Image(to_image_ref(url, ctx.images, url_field)))
        elif kind == "image":
            payload = part.get("image", part.get("value", part.get("url", part.get("path"))))
            # a bare {"type": "image"} (processor chat-template style) takes the record's next image
            parts.append(SLOT if payload is None else Image(to_image_ref(payload, ctx.images, f"{pw}.image")))
        elif kind in ("tool_call", "tool_calls"):
            parts.extend(tool_calls(ctx, part.get(value_key), f"{pw}.{value_key}"))
        elif kind in _VIDEO_KINDS:
            raise ctx.error(VIDEO_UNSUPPORTED, f"{pw}.type")
        elif kind in _AUDIO_KINDS:
            raise ctx.error(AUDIO_UNSUPPORTED, f"{pw}.type")
        elif kind == "reasoning":
            raise ctx.error("reasoning parts are not supported (no mlan template has a place for them)", f"{pw}.type")
        else:
            raise ctx.error(f"unknown content part type {kind!r}; allowed: {_PART_KINDS}", f"{pw}.type")
    return parts


def _message_turns(ctx: RecordContext, messages: Any, key: str) -> list[Turn]:
    if not isinstance(messages, list):
        raise ctx.error(f"expected a list of messages, got {type(messages).__name__}", key)
    turns = []
    for i, msg in enumerate(messages):
        where = f"{key}[{i}]"
        if not isinstance(msg, dict):
            raise ctx.error(f"expected an object with role/content, got {type(msg).__name__}", where)
        role = ctx.role(ctx.require(msg, "role", f"{where}.role"), f"{where}.role")
        calls: list = []
        if role == "assistant":
            for call_key in ("tool_calls", "function_call"):  # OpenAI's current and legacy spellings
                if msg.get(call_key) not in (None, []):
                    calls = tool_calls(ctx, msg[call_key], f"{where}.{call_key}")
                    break
        if "content" not in msg and not calls:
            ctx.missing(f"{where}.content")
        content = msg.get("content")
        parts = [] if calls and content in (None, "") else _content_parts(ctx, content, f"{where}.content")
        turns.append(Turn(role, parts + calls, f"{where}.content", loss_weight(ctx, msg, where)))
    return turns


def messages(ctx: RecordContext) -> Conversation:
    turns = system_turn(ctx) + _message_turns(ctx, require_turns(ctx, "messages"), "messages")
    return finish(ctx, turns, ctx.record_images(), tools=tools_of(ctx))


def _strip_end_marker(ctx: RecordContext, turns: list[Turn]) -> tuple[str, ...]:
    """GPT-3-style completions end with `<|endoftext|>`: the template adds its own end, so the marker goes."""
    last = turns[-1] if turns and turns[-1].role == "assistant" else None
    if last is None or not last.parts or not isinstance(last.parts[-1], str):
        return ()
    text = last.parts[-1].rstrip()
    for marker in ctx.spec.end_markers:
        if marker and text.endswith(marker):
            last.parts[-1] = text[: -len(marker)]
            return ("stripped end marker",)
    return ()


def prompt_completion(ctx: RecordContext) -> Conversation:
    rec = ctx.record
    turns = system_turn(ctx)
    for key, role in (("prompt", "user"), ("completion", "assistant")):
        value = ctx.require(rec, key, key, (str, list))
        turns += [Turn(role, [value], key)] if isinstance(value, str) else _message_turns(ctx, value, key)
    notes = _strip_end_marker(ctx, turns)
    return finish(ctx, turns, ctx.record_images(), tools=tools_of(ctx), notes=notes)
