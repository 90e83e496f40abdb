"""OpenAssistant message trees (`prompt` with nested, ranked `replies`): the best-ranked path, or every path."""
from __future__ import annotations

from mlan.sources.formats.draft import RecordContext, Turn, finish
from mlan.sources.formats.tools import tools_of
from mlan.sources.records import Conversation

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


def _oasst_paths(ctx: RecordContext, every: bool) -> list[list[tuple[dict, str]]]:
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


def _oasst_turns(ctx: RecordContext, path: list[tuple[dict, str]]) -> list[Turn]:
    turns = []
    for node, field in path:
        role = _OASST_ROLES.get(node.get("role"))
        if role is None:
            raise ctx.error(f"unknown role {node.get('role')!r}; allowed: prompter, assistant", f"{field}.role")
        turns.append(Turn(role, [ctx.require(node, "text", f"{field}.text")], f"{field}.text"))
    while turns and turns[-1].role == "user":  # a prompt nobody answered trains nothing
        turns.pop()
    return turns


def oasst_conversations(ctx: RecordContext) -> list[Conversation]:
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
        convs.append(finish(ctx, turns, ctx.record_images(), meta={"path": key[-1] if key else None},
                             tools=tools_of(ctx), id_suffix=suffix))
    return convs


def oasst(ctx: RecordContext) -> Conversation:
    convs = oasst_conversations(ctx)
    if len(convs) != 1:
        raise ctx.error(f"tree_paths: all gives {len(convs)} conversations for this record; this reader takes "
                        "one per record (mlan.sources.to_conversations gives them all)", "prompt")
    return convs[0]
