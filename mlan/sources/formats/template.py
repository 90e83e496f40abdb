"""The template format: any record's fields filled into prompt / response / image templates (str.format or
Jinja), one of several prompt paraphrases chosen per record by a seeded hash of its content."""
from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.sandbox

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


_MAX_REPEAT = 1_000_000  # characters or items a `*` may produce in a template
_MAX_EXPONENT = 4096


class _BoundedSandbox(jinja2.sandbox.ImmutableSandboxedEnvironment):
    """The sandbox plus bounds on `*` and `**`, so `{{ 'a' * 10**12 }}` or `{{ 9**9**9 }}` in a template is a
    refused record, not a build that runs out of memory or time."""

    intercepted_binops = frozenset(["*", "**"])

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" and isinstance(right, int) and abs(right) > _MAX_EXPONENT \
                and isinstance(left, int | float) and abs(left) > 1:
            raise jinja2.sandbox.SecurityError(f"exponent {right} is too large")
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, str | list | tuple) and isinstance(n, int) and len(seq) * n > _MAX_REPEAT:
                    raise jinja2.sandbox.SecurityError(f"repetition to {len(seq) * n} items is too large")
        return super().call_binop(context, operator, left, right)


@lru_cache(maxsize=64)
def _jinja(text: str) -> jinja2.Template:
    """Sandboxed (as transformers renders chat templates): a recipe's template reaches no Python object, so
    `{{ cycler.__init__.__globals__.os }}` is a SecurityError, never a command (design.md invariant 6)."""
    env = _BoundedSandbox(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)
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
        except jinja2.sandbox.SecurityError as err:
            raise ctx.error(f"template {what}: refused by the sandbox (unsafe): {err}", None) from None
        except jinja2.TemplateError as err:
            raise ctx.error(f"template {what} {text!r}: {err}", None) from None
        except (ArithmeticError, TypeError, ValueError, LookupError, AttributeError, RecursionError) as err:
            raise ctx.error(f"template {what} cannot be rendered: {type(err).__name__}: {err}", None) from None
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
