"""Instruction data in any common format → `Conversation` records (see docs/sources.md)."""
from mlan.sources.formats import (
    FORMATS,
    IMAGE_PLACEHOLDER,
    canonical_json,
    choose_prompt,
    record_id,
    to_conversation,
    to_conversations,
)
from mlan.sources.images import image_root, probe_image, to_image_ref
from mlan.sources.readers import SourceError, iter_conversations, iter_source, read_records
from mlan.sources.records import Conversation, Image, ImageRef, Message, RecordError, Text

__all__ = [
    "FORMATS", "IMAGE_PLACEHOLDER", "Conversation", "Image", "ImageRef", "Message", "RecordError", "SourceError",
    "Text", "canonical_json", "choose_prompt", "image_root", "iter_conversations", "iter_source", "probe_image",
    "read_records", "record_id", "to_conversation", "to_conversations", "to_image_ref",
]
