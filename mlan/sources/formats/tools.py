"""Tool schemas, tool calls and per-message loss weights, in the spellings the chat formats use (OpenAI,
ShareGPT, LLaMA-Factory)."""
from __future__ import annotations

import json
from typing import Any

from mlan.sources.formats.draft import RecordContext
from mlan.sources.records import ToolCall


def _json_value(ctx: RecordContext, value: Any, field: str, what: str) -> Any:
    """A JSON document kept as a string inside the record (ShareGPT `tools`, `function_call`, OpenAI `arguments`)."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as err:
        raise ctx.error(f"{what} is not valid JSON: {err}", field) from None


def tools_of(ctx: RecordContext) -> tuple[str, ...]:
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


def _tool_call(ctx: RecordContext, call: Any, where: str) -> ToolCall:
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


def tool_calls(ctx: RecordContext, calls: Any, where: str) -> list[ToolCall]:
    calls = _json_value(ctx, calls, where, "the tool call")
    if isinstance(calls, dict):
        return [_tool_call(ctx, calls, where)]
    if not isinstance(calls, list) or not calls:
        raise ctx.error("expected a tool call or a non-empty list of them", where)
    return [_tool_call(ctx, c, f"{where}[{j}]") for j, c in enumerate(calls)]


def loss_weight(ctx: RecordContext, msg: dict, where: str) -> bool:
    """LLaMA-Factory's per-message `loss_weight`: 0 → not trained, 1 → trained (the loss mask is binary)."""
    weight = msg.get("loss_weight")
    if weight is None:
        return True
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight not in (0, 1):
        raise ctx.error(f"loss_weight must be 0 (not trained) or 1 (trained), got {weight!r}", f"{where}.loss_weight")
    return weight == 1
