"""Instruction formats → `Conversation`: alpaca, sharegpt, llava, messages, prompt_completion, template, oasst.

Each format only says where a record keeps its turns; placeholder filling, image resolution, tool schemas
and the checks every conversation must pass (roles and their order, a trained assistant turn, no empty
assistant turn, no video) are shared. Anything wrong with one record is a `RecordError` naming the file,
the record index and the field.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from mlan.recipe import SourceSpec, TemplateSpec
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
class _Slot:
    """An image placeholder waiting for the record's next image."""


_SLOT = _Slot()
_DraftPart = Any  # str | Image | _Slot
_PLACEHOLDER_SPLIT = re.compile(f"({re.escape(IMAGE_PLACEHOLDER)})")


@dataclass
class _Turn:
    role: str
    parts: list  # str | Image | ToolCall | _Slot
    field: str  # where the turn lives in the record (for errors)
    trained: bool = True  # False: `loss_weight: 0`


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


def _check_no_video(ctx: _Ctx, turns: list[_Turn], images: list) -> None:
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


def _check_order(ctx: _Ctx, turns: list[_Turn]) -> None:
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


def _finish(ctx: _Ctx, turns: list[_Turn], images: list[tuple[Any, str]], meta: dict | None = None,
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
        first_user = next(t for t in turns if t.role == "user")  # _check_order: there is one
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


# ---------------------------------------------------------------- tools
def _json_value(ctx: _Ctx, value: Any, field: str, what: str) -> Any:
    """A JSON document kept as a string inside the record (ShareGPT `tools`, `function_call`, OpenAI `arguments`)."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as err:
        raise ctx.error(f"{what} is not valid JSON: {err}", field) from None


def _tools(ctx: _Ctx) -> tuple[str, ...]:
    """The record's `tools` (a JSON string or a list; bare schemas or OpenAI's {"type": "function", …}).

    Normalised to OpenAI's wrapped form, what `apply_chat_template(tools=…)` receives for a Python function.
    """
    raw = ctx.record.get("tools")
    if raw in (None, "", []):
        return ()
    tools = _json_value(ctx, raw, "tools", "tools")
    if isinstance(tools, dict):
        tools = [tools]
    if not isinstance(tools, list):
        raise ctx.error(f"expected a list of function schemas, got {type(tools).__name__}", "tools")
    out = []
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        tool = _json_value(ctx, tool, where, where)
        if not isinstance(tool, dict):
            raise ctx.error(f"expected a function schema object, got {type(tool).__name__}", where)
        if tool.get("type") == "function" and isinstance(tool.get("function"), dict):
            schema, where = tool["function"], f"{where}.function"
        else:
            schema = tool
        if not isinstance(schema.get("name"), str) or not schema["name"]:
            raise ctx.error("a function schema needs a name", f"{where}.name")
        out.append(json.dumps({"type": "function", "function": schema}, ensure_ascii=False))
    return tuple(out)


def _tool_call(ctx: _Ctx, call: Any, where: str) -> ToolCall:
    """One call: {"name", "arguments" | "parameters"} or OpenAI's {"id", "type", "function": {"name", "arguments"}}."""
    if not isinstance(call, dict):
        raise ctx.error(f"expected a tool call object, got {type(call).__name__}", where)
    call_id = call.get("id") if isinstance(call.get("id"), str) else None
    if isinstance(call.get("function"), dict):
        call, where = call["function"], f"{where}.function"
    name = ctx.require(call, "name", f"{where}.name")
    key = "arguments" if "arguments" in call or "parameters" not in call else "parameters"
    args = _json_value(ctx, call.get(key, {}), f"{where}.{key}", "the call's arguments")
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise ctx.error(f"a call's arguments must be a JSON object, got {type(args).__name__}", f"{where}.{key}")
    return ToolCall(name=name, arguments=json.dumps(args, ensure_ascii=False), id=call_id)


def _tool_calls(ctx: _Ctx, calls: Any, where: str) -> list[ToolCall]:
    calls = _json_value(ctx, calls, where, "the tool call")
    if isinstance(calls, dict):
        return [_tool_call(ctx, calls, where)]
    if not isinstance(calls, list) or not calls:
        raise ctx.error("expected a tool call or a non-empty list of them", where)
    return [_tool_call(ctx, c, f"{where}[{j}]") for j, c in enumerate(calls)]


def _loss_weight(ctx: _Ctx, msg: dict, where: str) -> bool:
    """LLaMA-Factory's per-message `loss_weight`: 0 → not trained, 1 → trained (the loss mask is binary)."""
    weight = msg.get("loss_weight")
    if weight is None:
        return True
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight not in (0, 1):
        raise ctx.error(f"loss_weight must be 0 (not trained) or 1 (trained), got {weight!r}", f"{where}.loss_weight")
    return weight == 1


# ---------------------------------------------------------------- formats
def _system_turn(ctx: _Ctx) -> list[_Turn]:
    system = ctx.optional_str(ctx.record, "system", "system")
    return [_Turn("system", [system], "system")] if system else []


def _is_tree(record: dict) -> bool:
    prompt = record.get("prompt")
    return isinstance(prompt, dict) and ("replies" in prompt or "text" in prompt)


def _require_turns(ctx: _Ctx, key: str) -> list:
    """The record's list of turns; an OpenAssistant tree gets a reason that says what it is."""
    if key not in ctx.record and _is_tree(ctx.record):
        raise ctx.error(f"missing field {key!r}: the record is a message tree (`prompt` with nested `replies`, "
                        "OpenAssistant's layout); use format: oasst", key)
    return ctx.require(ctx.record, key, key, list)


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
    return _finish(ctx, turns, ctx.record_images(), tools=_tools(ctx))


def _sharegpt(ctx: _Ctx) -> Conversation:
    rec = ctx.record
    key = "conversations" if "conversations" in rec or "messages" not in rec else "messages"
    convs = _require_turns(ctx, key)
    turns = _system_turn(ctx)
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
            calls = _tool_calls(ctx, value, f"{where}.{value_key}")
            turns.append(_Turn("assistant", calls, f"{where}.{value_key}", _loss_weight(ctx, item, where)))
            continue
        role = ctx.role(tag, f"{where}.{role_key}")
        if not isinstance(value, str):
            raise ctx.error(f"expected str, got {type(value).__name__}", f"{where}.{value_key}")
        turns.append(_Turn(role, [value], f"{where}.{value_key}", _loss_weight(ctx, item, where)))
    return _finish(ctx, turns, ctx.record_images(), tools=_tools(ctx))


_TEXT_KINDS = ("text", "input_text", "output_text")
_IMAGE_URL_KINDS = ("image_url", "input_image")
_VIDEO_KINDS = ("video", "video_url", "input_video")
_AUDIO_KINDS = ("audio", "audio_url", "input_audio")
_PART_KINDS = "text, image_url, image, tool_call"


def _part_kind(part: dict) -> str | None:
    if part.get("type"):
        return part["type"]
    return next((k for k in ("text", "image_url", "image") if k in part), None)


def _content_parts(ctx: _Ctx, content: Any, where: str) -> list:
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
                ctx._missing(url_field)
            parts.append(Image(to_image_ref(url, ctx.images, url_field)))
        elif kind == "image":
            payload = part.get("image", part.get("value", part.get("url", part.get("path"))))
            # a bare {"type": "image"} (processor chat-template style) takes the record's next image
            parts.append(_SLOT if payload is None else Image(to_image_ref(payload, ctx.images, f"{pw}.image")))
        elif kind in ("tool_call", "tool_calls"):
            parts.extend(_tool_calls(ctx, part.get(value_key), f"{pw}.{value_key}"))
        elif kind in _VIDEO_KINDS:
            raise ctx.error(VIDEO_UNSUPPORTED, f"{pw}.type")
        elif kind in _AUDIO_KINDS:
            raise ctx.error(AUDIO_UNSUPPORTED, f"{pw}.type")
        elif kind == "reasoning":
            raise ctx.error("reasoning parts are not supported (no mlan template has a place for them)", f"{pw}.type")
        else:
            raise ctx.error(f"unknown content part type {kind!r}; allowed: {_PART_KINDS}", f"{pw}.type")
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
        calls: list = []
        if role == "assistant":
            for call_key in ("tool_calls", "function_call"):  # OpenAI's current and legacy spellings
                if msg.get(call_key) not in (None, []):
                    calls = _tool_calls(ctx, msg[call_key], f"{where}.{call_key}")
                    break
        if "content" not in msg and not calls:
            ctx._missing(f"{where}.content")
        content = msg.get("content")
        parts = [] if calls and content in (None, "") else _content_parts(ctx, content, f"{where}.content")
        turns.append(_Turn(role, parts + calls, f"{where}.content", _loss_weight(ctx, msg, where)))
    return turns


def _messages(ctx: _Ctx) -> Conversation:
    turns = _system_turn(ctx) + _message_turns(ctx, _require_turns(ctx, "messages"), "messages")
    return _finish(ctx, turns, ctx.record_images(), tools=_tools(ctx))


def _strip_end_marker(ctx: _Ctx, turns: list[_Turn]) -> tuple[str, ...]:
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


def _prompt_completion(ctx: _Ctx) -> Conversation:
    rec = ctx.record
    turns = _system_turn(ctx)
    for key, role in (("prompt", "user"), ("completion", "assistant")):
        value = ctx.require(rec, key, key, (str, list))
        turns += [_Turn(role, [value], key)] if isinstance(value, str) else _message_turns(ctx, value, key)
    notes = _strip_end_marker(ctx, turns)
    return _finish(ctx, turns, ctx.record_images(), tools=_tools(ctx), notes=notes)


# ---------------------------------------------------------------- oasst
_OASST_ROLES = {"prompter": "user", "assistant": "assistant"}


def _oasst_children(node: dict) -> list[tuple[int, dict]]:
    replies = node.get("replies") or []
    return [(j, r) for j, r in enumerate(replies) if isinstance(r, dict) and not r.get("deleted")] \
        if isinstance(replies, list) else []


def _by_rank(item: tuple[int, dict]) -> tuple:
    """Rank 0 is best; unranked replies come after ranked ones, in file order."""
    j, reply = item
    rank = reply.get("rank")
    return (not isinstance(rank, (int, float)), rank if isinstance(rank, (int, float)) else 0, j)


def _oasst_paths(ctx: _Ctx, every: bool) -> list[list[tuple[dict, str]]]:
    """Root-to-leaf paths of (node, field) pairs: the best-ranked one, or all of them."""
    root = ctx.require(ctx.record, "prompt", "prompt", dict)
    paths: list[list[tuple[dict, str]]] = []
    stack = [[(root, "prompt")]]
    while stack:
        path = stack.pop()
        node, field = path[-1]
        children = sorted(_oasst_children(node), key=_by_rank)
        if not children:
            paths.append(path)
            continue
        chosen = children if every else children[:1]
        stack.extend([*path, (child, f"{field}.replies[{j}]")] for j, child in reversed(chosen))
    return paths


def _oasst_turns(ctx: _Ctx, path: list[tuple[dict, str]]) -> list[_Turn]:
    turns = []
    for node, field in path:
        role = _OASST_ROLES.get(node.get("role"))
        if role is None:
            raise ctx.error(f"unknown role {node.get('role')!r}; allowed: prompter, assistant", f"{field}.role")
        turns.append(_Turn(role, [ctx.require(node, "text", f"{field}.text")], f"{field}.text"))
    while turns and turns[-1].role == "user":  # a prompt nobody answered trains nothing
        turns.pop()
    return turns


def oasst_conversations(ctx: _Ctx) -> list[Conversation]:
    """An OpenAssistant message tree → its best-ranked path, or (`tree_paths: all`) one conversation per path."""
    every = ctx.spec.tree_paths == "all"
    convs, seen = [], set()
    for path in _oasst_paths(ctx, every):
        turns = _oasst_turns(ctx, path)
        key = tuple(field for _, field in path[: len(turns)])
        if key in seen:
            continue
        seen.add(key)
        suffix = f"/{len(convs)}" if every else ""
        convs.append(_finish(ctx, turns, ctx.record_images(), meta={"path": key[-1] if key else None},
                             tools=_tools(ctx), id_suffix=suffix))
    return convs


def _oasst(ctx: _Ctx) -> Conversation:
    convs = oasst_conversations(ctx)
    if len(convs) != 1:
        raise ctx.error(f"tree_paths: all gives {len(convs)} conversations for this record; this reader takes "
                        "one per record (mlan.sources.to_conversations gives them all)", "prompt")
    return convs[0]


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
    "oasst": _oasst,
}


def to_conversation(spec: SourceSpec, index: int, record: dict, file: str) -> Conversation:
    """One raw record → a checked Conversation, or a RecordError naming file, index, reason and field."""
    if not isinstance(record, dict):
        raise RecordError(file, index, f"expected a JSON object, got {type(record).__name__}")
    return FORMATS[spec.format](_Ctx(spec, index, record, file))


def to_conversations(spec: SourceSpec, index: int, record: dict, file: str) -> list[Conversation]:
    """Every conversation a record holds: one, except an OpenAssistant tree read with `tree_paths: all`."""
    if spec.format == "oasst" and isinstance(record, dict):
        return oasst_conversations(_Ctx(spec, index, record, file))
    return [to_conversation(spec, index, record, file)]
