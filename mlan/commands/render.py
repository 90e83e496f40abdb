"""`mlan render RECIPE --source NAME [--limit N] [--json]`: a source's documents with their loss masks, for a
person (trained spans in [[…]]) or a script (one JSON object per document)."""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from typing import TYPE_CHECKING, Any

from mlan.commands.options import add_set, example
from mlan.errors import UserError

if TYPE_CHECKING:
    from rich.console import Console

    from mlan.recipe import SourceSpec
    from mlan.render import Document, Renderer


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("render", help="render a recipe source's documents with their loss masks",
                       description="Render one source's documents as the build does: the text with trained "
                                   "spans in [[…]], or one JSON object per document.",
                       epilog=example("mlan render recipes/shared-data.yaml --source nlvr --limit 2"))
    p.add_argument("recipe", help="an mlan recipe (README.md, Recipes)")
    p.add_argument("--source", required=True, help="source name in the recipe")
    p.add_argument("--limit", type=int, default=None, help="render at most N documents (default: all)")
    p.add_argument("--json", action="store_true", help="one JSON object per document")
    add_set(p)
    p.set_defaults(handler=render_command)


def render_command(args: argparse.Namespace) -> int:
    """Render every document of the source (up to --limit); no usable document at all is a user error."""
    # lazy (start-up): these pull pydantic, rich and the tokenizer stack, 1 s; `mlan --help` is 0.1 s without
    from rich.console import Console

    from mlan.recipe import load_recipe
    from mlan.render import Renderer
    from mlan.sources.images import ImageLimits
    from mlan.sources.readers import check_source_paths

    recipe = load_recipe(args.recipe, args.overrides)
    spec = next((s for s in recipe.sources if s.name == args.source), None)
    if spec is None:
        names = ", ".join(s.name for s in recipe.sources) or "(none)"
        raise UserError(f"{args.recipe}: no source named {args.source!r}; the recipe has: {names}")
    check_source_paths([spec])  # a missing path or a folder without data files: one line, exit 2
    limits = ImageLimits(recipe.mixture.max_image_pixels, recipe.mixture.max_image_aspect)  # as the build
    renderer = Renderer(recipe.model, recipe.mixture.seq_len, recipe.mixture.overlong, image_limits=limits)
    counts, first_failure = _render_source(spec, renderer, args.limit, args.json, recipe.mixture.max_record_bytes)
    Console(stderr=True, highlight=False, soft_wrap=True).print(
        f"{counts['documents']} documents ({counts['truncated']} truncated), {counts['errors']} errors, "
        f"{counts['dropped']} dropped; {counts['tokens']} tokens, {counts['loss_tokens']} trained",
    )
    if counts["documents"] == 0:  # nothing usable is a failure a script must see, not a quiet success
        why = f"; the first: {first_failure}" if first_failure else " (the source has no records)"
        raise UserError(f"source {spec.name!r}: no record rendered ({counts['errors']} rejected, "
                        f"{counts['dropped']} dropped){why}".replace("\n", " "))
    return 0


def _render_source(spec: SourceSpec, renderer: Renderer, limit: int | None,
                   as_json: bool, max_record_bytes: int) -> tuple[Counter, str]:
    """Print each document as it renders, each rejected or dropped record as a line on stderr; returns the
    counts and the first failure."""
    from rich.console import Console  # lazy (start-up): as in render_command

    from mlan.render import DocumentDropped, source_conversations
    from mlan.sources.records import RecordError

    image_id = renderer.family.image_token_id if renderer.family.image_token is not None else None
    console = Console(highlight=False, soft_wrap=True)
    counts: Counter = Counter({"documents": 0, "errors": 0, "dropped": 0, "truncated": 0, "tokens": 0,
                               "loss_tokens": 0})
    first_failure = ""
    for item in source_conversations(spec):
        if limit is not None and counts["documents"] + counts["errors"] + counts["dropped"] >= limit:
            break
        if isinstance(item, RecordError):
            counts["errors"] += 1
            first_failure = first_failure or str(item)
            print(f"error: {item}", file=sys.stderr)
            continue
        try:
            if (n := item.text_bytes()) > max_record_bytes:  # as the build: refused before the tokenizer
                raise RecordError(item.meta.get("file", ""), item.meta.get("index"),
                                  f"{n:,} bytes of text, more than mixture.max_record_bytes = {max_record_bytes:,}")
            doc = renderer.render(item)
        except RecordError as e:
            counts["errors"] += 1
            first_failure = first_failure or str(e)
            print(f"error: {e}", file=sys.stderr)
            continue
        except DocumentDropped as e:
            counts["dropped"] += 1
            first_failure = first_failure or f"dropped: {e}"
            print(f"dropped: {e}", file=sys.stderr)
            continue
        counts["documents"] += 1
        counts["truncated"] += int(doc.truncated)
        counts["tokens"] += doc.n_tokens
        counts["loss_tokens"] += doc.n_loss_tokens
        if as_json:
            sys.stdout.write(json.dumps(doc.to_json()) + "\n")
        else:
            _print_document(console, doc, item.notes, renderer.tokenizer, image_id)
    return counts, first_failure


def _print_document(console: Console, doc: Document, notes: list[str], tokenizer: Any,
                    image_id: int | None) -> None:
    """A header line, one line per image, then the text with trained spans bold green in [[…]]."""
    from rich.markup import escape  # lazy (start-up): as in render_command
    from rich.text import Text

    from mlan.render import document_spans

    head = (f"── {doc.doc_id} · {doc.modality} · {doc.n_tokens} tokens · {doc.n_loss_tokens} trained"
            f"{' · truncated' if doc.truncated else ''}{''.join(f' · {note}' for note in notes)}")
    console.print(f"[bold]{escape(head)}[/bold]")
    for i, (size, ext, tiles, p) in enumerate(zip(doc.image_sizes, doc.image_exts, doc.image_tiles,
                                                   doc.image_positions)):
        console.print(escape(f"   image {i}: {size[0]}x{size[1]} {ext}, at token {p}, {tiles} tile(s)"))
    text = Text()
    for run, trained in document_spans(doc, tokenizer, image_id):
        text.append(f"[[{run}]]" if trained else run, style="bold green" if trained else None)
    console.print(text)
    console.print()
