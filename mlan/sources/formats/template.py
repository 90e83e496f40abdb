"""The template format: any record's fields filled into prompt / response / image templates (str.format or
Jinja), one of several prompt paraphrases chosen per record by a seeded hash of its content."""
from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

import jinja2

from mlan.recipe import TemplateSpec
from mlan.sources.formats.draft import RecordContext, Turn, canonical_json, choose_prompt, finish
from mlan.sources.records import Conversation


class _Fields(dict):
    """A record for str.format_map: a missing or null field names itself."""

    def __getitem__(self, key: str) -> Any:
        if not dict.__contains__(self, key) or dict.__getitem__(self, key) is None:
            raise _MissingField(key)
        return dict.__getitem__(self, key)


class _MissingField(KeyError):
    pass


@lru_cache(maxsize=64)
def _jinja(text: str) -> jinja2.Template:
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)
    return env.from_string(text)


_UNDEFINED = re.compile(r"'([^']+)' is undefined|has no attribute '([^']+)'")


def _render(ctx: RecordContext, template: TemplateSpec, text: str, what: str) -> str:
    if template.engine == "jinja":
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


def from_template(ctx: RecordContext) -> Conversation:
    template = ctx.spec.template
    assert template is not None  # SourceSpec's validator guarantees it
    canonical = canonical_json(ctx.record)
    k = choose_prompt(canonical, template.seed, len(template.prompts))
    turns = []
    if template.system:
        turns.append(Turn("system", [_render(ctx, template, template.system, "system")], "template.system"))
    turns.append(Turn("user", [_render(ctx, template, template.prompts[k], f"prompts[{k}]")], f"template.prompts[{k}]"))
    turns.append(Turn("assistant", [_render(ctx, template, template.response, "response")], "template.response"))
    if template.image:
        images = [(_render(ctx, template, template.image, "image"), "template.image")]
    else:
        images = ctx.record_images()
    return finish(ctx, turns, images, meta={"prompt": k}, canonical=canonical)
