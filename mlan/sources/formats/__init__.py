"""Instruction formats → `Conversation`: alpaca, sharegpt, llava, messages, prompt_completion, template, oasst.

Each format only says where a record keeps its turns (chat, oasst, template); placeholder filling, image
resolution, tool schemas and the checks every conversation must pass are shared (draft, tools).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from mlan.recipe import SourceSpec
from mlan.sources.formats.chat import alpaca, messages, prompt_completion, sharegpt
from mlan.sources.formats.draft import (
    IMAGE_PLACEHOLDER,
    RecordContext,
    canonical_json,
    choose_prompt,
    record_id,
)
from mlan.sources.formats.oasst import oasst, oasst_conversations
from mlan.sources.formats.template import from_template
from mlan.sources.records import Conversation, RecordError

T = TypeVar("T")

FORMATS: dict[str, Callable[[RecordContext], Conversation]] = {
    "alpaca": alpaca,
    "sharegpt": sharegpt,
    "llava": sharegpt,  # ShareGPT turns + `image` / `images`; the image handling is shared
    "messages": messages,
    "prompt_completion": prompt_completion,
    "template": from_template,
    "oasst": oasst,
}


def to_conversation(spec: SourceSpec, index: int, record: dict, file: str) -> Conversation:
    """One raw record → a checked Conversation, or a RecordError naming file, index, reason and field."""
    if not isinstance(record, dict):
        raise RecordError(file, index, f"expected a JSON object, got {type(record).__name__}")
    return _converted(lambda: FORMATS[spec.format](RecordContext(spec, index, record, file)), file, index)


def to_conversations(spec: SourceSpec, index: int, record: dict, file: str) -> list[Conversation]:
    """Every conversation a record holds: one, except an OpenAssistant tree read with `tree_paths: all`."""
    if spec.format == "oasst" and isinstance(record, dict):
        return _converted(lambda: oasst_conversations(RecordContext(spec, index, record, file)), file, index)
    return [to_conversation(spec, index, record, file)]


def _converted(convert: Callable[[], T], file: str, index: int) -> T:
    """`convert()`, with any failure a converter did not foresee turned into the record's RecordError:
    a record is data, so no value in it may stop a build (hostile inputs, docs/sources.md)."""
    try:
        return convert()
    except RecordError:
        raise
    except RecursionError:
        raise RecordError(file, index, "record nested too deeply to convert") from None
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, UnicodeError, OverflowError) as err:
        text = " ".join(str(err).split())[:300]
        raise RecordError(file, index, f"cannot convert the record: {type(err).__name__}: {text}") from None

__all__ = ["FORMATS", "IMAGE_PLACEHOLDER", "canonical_json", "choose_prompt", "record_id", "to_conversation",
           "to_conversations"]
