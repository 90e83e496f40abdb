"""Conversation records: the one shape every instruction format is mapped onto.

Nothing downstream of `mlan.sources` knows which file format a record came from.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import PurePosixPath
from typing import Literal

import fsspec

from mlan.errors import MlanError

Role = Literal["system", "user", "assistant", "tool"]
ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool")


class RecordError(MlanError, ValueError):
    """A single bad input record. A build counts and logs these; it never crashes on one.

    The message always says the file, the record index and the reason.
    """

    def __init__(self, file: str, index: int | None, reason: str, field_path: str | None = None):
        self.file = str(file)
        self.index = index
        self.reason = reason
        self.field = field_path
        where = f"{self.file}, record {index}" if index is not None else self.file
        what = f" (field {field_path!r})" if field_path else ""
        super().__init__(f"{where}{what}: {reason}")

    def to_json(self) -> dict:
        return {"file": self.file, "index": self.index, "field": self.field, "reason": self.reason}

    def __reduce__(self):
        """Pickle by fields, so an error survives the trip to and from a Ray worker."""
        return (type(self), (self.file, self.index, self.reason, self.field))


@dataclass(frozen=True)
class ImageRef:
    """An image as encoded bytes, or a path already resolved (and checked) under the source's image root."""

    data: bytes | None = None
    path: str | None = None

    def __post_init__(self) -> None:
        if (self.data is None) == (self.path is None):
            raise ValueError("ImageRef needs exactly one of data or path")

    def read_bytes(self) -> bytes:
        if self.data is not None:
            return self.data
        with fsspec.open(self.path, "rb") as f:
            return f.read()

    @property
    def suffix(self) -> str:
        if self.path is not None:
            return PurePosixPath(self.path).suffix.lstrip(".").lower() or "bin"
        return "bin"


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class Image:
    ref: ImageRef


@dataclass(frozen=True)
class ToolCall:
    """An assistant's call of a function; `arguments` is the JSON text of an object, key order kept.

    Kept as text so a Message stays hashable and the schema's key order reaches the prompt unchanged.
    """

    name: str
    arguments: str = "{}"
    id: str | None = None

    @property
    def arguments_dict(self) -> dict:
        return json.loads(self.arguments)


Part = Text | Image | ToolCall


@dataclass(frozen=True)
class Message:
    role: Role
    parts: tuple[Part, ...]
    # False: rendered but never trained (LLaMA-Factory's `loss_weight: 0`); only assistant turns are trained
    trained: bool = True

    @cached_property  # frozen: computed once (renderers and checks ask for it per piece)
    def text(self) -> str:
        """The message's text with images dropped (for display and checks)."""
        return "".join(p.text for p in self.parts if isinstance(p, Text))

    @cached_property
    def images(self) -> tuple[ImageRef, ...]:
        return tuple(p.ref for p in self.parts if isinstance(p, Image))

    @cached_property
    def tool_calls(self) -> tuple[ToolCall, ...]:
        return tuple(p for p in self.parts if isinstance(p, ToolCall))


@dataclass(frozen=True)
class Conversation:
    id: str
    source: str
    messages: tuple[Message, ...]
    meta: dict = field(default_factory=dict, hash=False, compare=False)
    # function schemas the conversation may call, each the JSON text of {"type": "function", "function": {…}}
    tools: tuple[str, ...] = ()
    # what conversion changed in the record, e.g. "stripped end marker" (counted by the build report)
    notes: tuple[str, ...] = ()

    @property
    def tool_schemas(self) -> list[dict]:
        return [json.loads(t) for t in self.tools]

    @cached_property
    def images(self) -> tuple[ImageRef, ...]:
        return tuple(ref for m in self.messages for ref in m.images)

    @property
    def modality(self) -> str:
        return "image_text" if self.images else "text"

    def text_bytes(self) -> int:
        """UTF-8 bytes of everything the tokenizer will read: message texts, tool calls, tool schemas.

        What `mixture.max_record_bytes` limits (images have their own limits); counted before tokenizing.
        """
        n = sum(len(t.encode("utf-8", "surrogatepass")) for t in self.tools)
        for m in self.messages:
            for p in m.parts:
                if isinstance(p, Text):
                    n += len(p.text.encode("utf-8", "surrogatepass"))
                elif isinstance(p, ToolCall):
                    n += len(p.name.encode("utf-8", "surrogatepass")) + len(p.arguments.encode("utf-8", "surrogatepass"))
        return n
