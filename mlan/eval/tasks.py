"""Benchmark files → evaluation items, with the file's format inferred from its records.

Formats (all local JSON or JSONL):
- `llm_adapters`: {instruction, answer} as LLM-Adapters renders ARC ("answerK", options from the
  "Answer format: answer1/…" line) and BoolQ ("true"/"false"); scored by log-likelihood choice.
- `gsm8k`: {question, answer "… #### N"}; greedy generation, the number after `####` is the gold answer.
- `nlvr`: {sentence, label, identifier, directory}; image images/{directory}/{split}-{identifier}-0.png where
  {split} is the file's stem (dev.json → dev-…, test1.json → test1-…), else the dev- name; true/false by
  log-likelihood choice.
- `hf_mc`: ARC / OpenBookQA as on the Hub: {question | question_stem, choices {text, label}, answerKey}.
- `boolq_hf`: {question, passage, answer: bool}.
- `mc`: {question, choices [..], answer: index | letter | choice text} (optional `image`).
- `qa`: {question, answer} (optional `image`); generation + exact match after answer extraction.

An `image_pattern` (task key or `mlan eval --image-pattern`) overrides where any format's image is: a format
string over the record's fields plus {split} (the file's stem), e.g. "images/{directory}/test1-{identifier}-0.png".
Image paths resolve under the image root (`images`, else the task file's folder) and never outside it,
with the same containment check as build sources (mlan.sources.images.resolve_path).

A `source` (a recipe task's training source, a `template` SourceSpec) replaces the format's prompt: each item's
prompt is that record rendered by the source, as the build renders it (training_conversation);
the options, gold and image stay the format's. Such a task is scored on those prompts (labels / vision-choice /
generate), never by the lm-eval or mlan-paper protocol, which bring prompts of their own.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from mlan import progress
from mlan.errors import UserError
from mlan.eval.protocols import (
    PAPER_MAX_NEW_TOKENS,
    PAPER_PREFIX,
    PROTOCOLS,
    Cloze,
    Parsed,
    cloze,
    paper_prompt,
    parse_adapters,
    prompt_style,
)
from mlan.recipe import SourceSpec
from mlan.sources.formats import to_conversations
from mlan.sources.images import ImageContext, resolve_path
from mlan.sources.records import Conversation, RecordError

Kind = Literal["choice", "generate"]
Group = Literal["language", "vision"]


@dataclass(frozen=True)
class Item:
    """One question: the user message, the options (choice tasks) and the gold answer.

    `cloze` holds lm-eval's (context, continuation) requests when the item is scored by the lm-eval
    protocol; `response_prefix` opens the assistant turn of a generative protocol (mlan-paper); `conversation`
    is the record as its training source renders it (the task's `source`): its turns before the answer are
    the prompt, in place of `prompt`.
    """

    prompt: str
    answer: str
    choices: tuple[str, ...] = ()
    image: str | None = None  # a local image path, resolved
    id: str = ""
    cloze: Cloze | None = None
    response_prefix: str = ""
    conversation: Conversation | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Task:
    """A benchmark file read into items, with how it is scored."""

    name: str
    path: str
    format: str
    kind: Kind
    group: Group
    items: list[Item] = field(default_factory=list)
    extractor: str = "auto"  # see mlan.eval.answers.extract_answer
    protocol: str = "labels"  # how this task is scored: lm-eval | mlan-paper | labels | generate | vision-choice
    style: str | None = None  # the lm-eval prompt (arc, openbookqa, piqa, boolq, winogrande, cloze)
    skipped: tuple[str, ...] = ()  # ids of records that do not parse into question and options
    max_new_tokens: int | None = None  # a protocol's own generation length (mlan-paper: 20)


_LETTERS = "ABCDEFGHIJ"


def _read_records(path: Path) -> list[dict]:
    """A JSON list (or {"data": [...]}) or JSON lines; errors name the file and line."""
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}: not valid JSON: {err}") from None
    elif stripped.startswith("{") and "\n" not in stripped.strip():
        data = [json.loads(stripped)]
    else:
        data = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                data.append(json.loads(line))
            except json.JSONDecodeError as err:
                # a single JSON object spread over lines, e.g. {"data": [...]}
                try:
                    whole = json.loads(text)
                except json.JSONDecodeError:
                    raise UserError(f"{path}: line {n}: not valid JSON: {err.msg}") from None
                data = whole.get("data") if isinstance(whole, dict) else None
                if not isinstance(data, list):
                    raise UserError(f"{path}: unknown task format: expected a JSON list or JSON lines") from None
                break
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list) or not data:
        raise UserError(f"{path}: unknown task format: no records (expected a JSON list or JSON lines)")
    for i, rec in enumerate(data):
        if not isinstance(rec, dict):
            raise UserError(f"{path}: record {i}: expected an object, got {type(rec).__name__}")
    return data


def infer_format(rec: dict[str, Any]) -> str | None:
    """The format name of a record from its keys, or None when it matches no known format."""
    keys = set(rec)
    if {"instruction", "answer"} <= keys:
        return "llm_adapters"
    if {"sentence", "label", "identifier", "directory"} <= keys:
        return "nlvr"
    if {"question", "answer"} <= keys and isinstance(rec["answer"], str) and "####" in rec["answer"]:
        return "gsm8k"
    if ({"question", "choices", "answerKey"} <= keys or {"question_stem", "choices", "answerKey"} <= keys) \
            and isinstance(rec["choices"], dict):
        return "hf_mc"
    if {"question", "passage", "answer"} <= keys and isinstance(rec["answer"], bool):
        return "boolq_hf"
    if {"question", "choices", "answer"} <= keys and isinstance(rec["choices"], list):
        return "mc"
    if {"question", "answer"} <= keys:
        return "qa"
    return None


def _need(rec: dict, key: str, path: Path, i: int, types: type | tuple = str) -> Any:
    if key not in rec:
        raise UserError(f"{path}: record {i}: field {key!r} missing")
    if not isinstance(rec[key], types):
        raise UserError(f"{path}: record {i}: field {key!r} has type {type(rec[key]).__name__}")
    return rec[key]


def _llm_adapters(rec: dict, path: Path, i: int) -> Item:
    instruction = _need(rec, "instruction", path, i)
    answer = str(_need(rec, "answer", path, i)).strip()
    extra = rec.get("input") or ""
    prompt = f"{instruction}\n\n{extra}".strip() if extra else instruction
    m = re.search(r"Answer format:\s*([^\n]+)", instruction)
    if m:
        choices = tuple(c.strip() for c in m.group(1).split("/") if c.strip())
    elif answer.lower() in ("true", "false"):
        choices = ("true", "false")
    else:
        raise UserError(f"{path}: record {i}: field 'instruction' has no 'Answer format: a/b/…' line")
    if answer not in choices:
        raise UserError(f"{path}: record {i}: field 'answer' {answer!r} is not one of {list(choices)}")
    return Item(prompt=prompt, answer=answer, choices=choices)


def gsm8k_gold(answer: str) -> str:
    """The number after GSM8K's `####` marker, commas removed."""
    return answer.rsplit("####", 1)[1].strip().replace(",", "")


def _resolve_image(value: str, path: Path, images: str | None, i: int, fld: str) -> str:
    """An image path of record `i` → an existing file inside the image root (else a one-line UserError)."""
    root = str(Path(images) if images else path.parent)
    try:
        return str(resolve_path(value, ImageContext(root=root, file=str(path), index=i), fld).path)
    except RecordError as err:
        raise UserError(str(err)) from None


def _pattern_image(rec: dict, pattern: str, path: Path, i: int) -> str:
    """`image_pattern` filled from the record's fields and {split} (the task file's stem)."""
    try:
        return pattern.format(**{**rec, "split": path.stem})
    except (KeyError, IndexError, ValueError) as err:
        raise UserError(f"{path}, record {i}: image_pattern {pattern!r} cannot be filled: {err!r}") from None


NLVR_PATTERNS = ("images/{directory}/{split}-{identifier}-0.png", "images/{directory}/dev-{identifier}-0.png")


def _record_image(fmt: str, rec: dict, path: Path, i: int, images: str | None, pattern: str | None) -> str | None:
    """The resolved image of a record: the pattern when given, else the format's own rule."""
    if pattern:
        return _resolve_image(_pattern_image(rec, pattern, path, i), path, images, i, "image_pattern")
    if fmt == "nlvr":
        _need(rec, "identifier", path, i, (str, int))
        _need(rec, "directory", path, i, (str, int))
        candidates = list(dict.fromkeys(_pattern_image(rec, p, path, i) for p in NLVR_PATTERNS))
        root = Path(images) if images else path.parent
        found = next((c for c in candidates if (root / c).is_file()), candidates[0])
        return _resolve_image(found, path, images, i, "identifier")
    return _resolve_image(rec["image"], path, images, i, "image") if rec.get("image") else None


def _item(fmt: str, rec: dict, path: Path, i: int, images: str | None, pattern: str | None = None) -> Item:
    if fmt == "llm_adapters":
        return _llm_adapters(rec, path, i)
    if fmt == "gsm8k":
        return Item(prompt=_need(rec, "question", path, i), answer=gsm8k_gold(_need(rec, "answer", path, i)))
    if fmt == "nlvr":
        image = _record_image(fmt, rec, path, i, images, pattern)
        prompt = f"{_need(rec, 'sentence', path, i)}\nIs this sentence true or false about the image?"
        label = str(_need(rec, "label", path, i)).lower()
        if label not in ("true", "false"):
            raise UserError(f"{path}: record {i}: field 'label' {label!r} is not true/false")
        return Item(prompt=prompt, answer=label, choices=("true", "false"), image=image)
    if fmt == "hf_mc":
        question = rec.get("question") or rec.get("question_stem")
        if not isinstance(question, str):
            raise UserError(f"{path}: record {i}: field 'question' missing")
        ch = rec["choices"]
        texts, labels = ch.get("text"), ch.get("label")
        if not isinstance(texts, list) or not isinstance(labels, list) or len(texts) != len(labels):
            raise UserError(f"{path}: record {i}: field 'choices' needs equal-length 'text' and 'label' lists")
        key = str(rec["answerKey"])
        if key not in labels:
            raise UserError(f"{path}: record {i}: field 'answerKey' {key!r} is not one of {labels}")
        return Item(prompt=question, answer=texts[labels.index(key)], choices=tuple(texts))
    if fmt == "boolq_hf":
        prompt = f"{_need(rec, 'passage', path, i)}\nQuestion: {_need(rec, 'question', path, i)}?"
        return Item(prompt=prompt, answer="true" if rec["answer"] else "false", choices=("true", "false"))
    image = _record_image(fmt, rec, path, i, images, pattern)
    question = _need(rec, "question", path, i)
    if fmt == "mc":
        choices = tuple(str(c) for c in rec["choices"])
        ans = rec["answer"]
        if isinstance(ans, int) and not isinstance(ans, bool) and 0 <= ans < len(choices):
            gold = choices[ans]
        elif isinstance(ans, str) and ans in choices:
            gold = ans
        elif isinstance(ans, str) and len(ans) == 1 and ans.upper() in _LETTERS[: len(choices)]:
            gold = choices[_LETTERS.index(ans.upper())]
        else:
            raise UserError(f"{path}: record {i}: field 'answer' {ans!r} is neither an index, a letter nor a choice")
        return Item(prompt=question, answer=gold, choices=choices, image=image)
    if fmt == "qa":
        ans = rec["answer"]
        if isinstance(ans, list) and ans:
            ans = ans[0]
        if not isinstance(ans, (str, int, float)) or isinstance(ans, bool):
            raise UserError(f"{path}: record {i}: field 'answer' has type {type(ans).__name__}")
        return Item(prompt=question, answer=str(ans), image=image)
    raise UserError(f"{path}: unknown task format {fmt!r}")


FORMATS = ("llm_adapters", "gsm8k", "nlvr", "hf_mc", "boolq_hf", "mc", "qa")
_CHOICE_FORMATS = {"llm_adapters", "nlvr", "hf_mc", "boolq_hf", "mc"}
_LANGUAGE_CHOICE_FORMATS = {"llm_adapters", "hf_mc", "boolq_hf", "mc"}  # scored by the run's protocol
_ID_KEYS = ("id", "idx", "identifier", "qid", "uid")


def record_id(rec: dict, index: int) -> str:
    """A stable item id: the record's own id field when it has one, else its 0-based index in the file."""
    for key in _ID_KEYS:
        value = rec.get(key)
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            return str(value)
    return str(index)


def _parse(fmt: str, rec: dict, path: Path, i: int) -> tuple[Parsed, str] | None:
    """Question, option texts and gold of a language choice record (+ BoolQ's passage); None: no parse."""
    if fmt == "llm_adapters":
        instruction, answer = rec.get("instruction"), rec.get("answer")
        if not isinstance(instruction, str) or not isinstance(answer, (str, bool)):
            return None
        return (p, "") if (p := parse_adapters(instruction, str(answer).lower()
                                              if isinstance(answer, bool) else answer)) else None
    item = _item(fmt, rec, path, i, None)
    if fmt == "boolq_hf":
        return Parsed(rec["question"], ("no", "yes"), int(bool(rec["answer"])), ("false", "true")), rec["passage"]
    question = rec.get("question") or rec.get("question_stem")
    labels = tuple(_LETTERS[: len(item.choices)])
    return Parsed(question, item.choices, item.choices.index(item.answer), labels), ""


def _protocol_item(protocol: str, style: str, parsed: Parsed, passage: str, item_id: str) -> Item:
    """An item scored by the lm-eval or mlan-paper protocol (see mlan.eval.protocols)."""
    gold = parsed.options[parsed.gold]
    if protocol == "lm-eval":
        request = cloze(style, parsed, passage)
        return Item(prompt=request.requests[0][0], answer=gold, choices=parsed.options, id=item_id, cloze=request)
    return Item(prompt=paper_prompt(parsed), answer=gold, choices=parsed.options, id=item_id,
                response_prefix=PAPER_PREFIX)


def read_ids(path: str | Path) -> dict[str | None, set[str]]:
    """`--items FILE`: ids one per line, or an items.jsonl ({"task", "id"} per line) → {task or None: ids}."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{path}: items file not found")
    out: dict[str | None, set[str]] = {}
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if line.startswith("{"):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path}: line {n}: not valid JSON: {err.msg}") from None
            if not isinstance(rec, dict) or "id" not in rec:
                raise UserError(f"{path}: line {n}: an items line needs an 'id'")
            out.setdefault(rec.get("task"), set()).add(str(rec["id"]))
        else:
            out.setdefault(None, set()).add(line)
    if not out:
        raise UserError(f"{path}: items file lists no ids")
    return out


def _select(records: list[dict], name: str, path: Path, limit: int | None,
            item_ids: dict[str | None, set[str]] | None) -> list[tuple[int, dict]]:
    """The records to score: those whose ids `--items` lists (all when None), then the first `limit`."""
    chosen = list(enumerate(records))
    if item_ids is not None:
        wanted = item_ids.get(name, item_ids.get(None))
        if wanted is None:
            raise UserError(f"{path}: the items file lists no ids for task {name!r}")
        have = {record_id(rec, i) for i, rec in chosen}
        missing = sorted(wanted - have)
        if missing:
            raise UserError(f"{path}: task {name!r} has no item with id {missing[0]!r} "
                            f"({len(missing)} listed ids missing)")
        chosen = [(i, rec) for i, rec in chosen if record_id(rec, i) in wanted]
    if limit is not None:
        if limit < 0:
            raise UserError(f"--limit must be >= 0, got {limit}")
        chosen = chosen[:limit]
    return chosen


def load_task(
    path: str | Path,
    name: str | None = None,
    *,
    kind: Kind | None = None,
    format: str | None = None,
    group: Group | None = None,
    images: str | None = None,
    limit: int | None = None,
    image_pattern: str | None = None,
    protocol: str | None = None,
    items: str | Path | dict | None = None,
    style: str | None = None,
    source: SourceSpec | None = None,
) -> Task:
    """Read a benchmark file; format, kind and group are inferred unless given.

    `protocol` (default lm-eval) decides how a language multiple-choice file is scored; `items` (a file or
    the mapping `read_ids` returns) keeps only the listed ids; `limit` then keeps the first N. `source` (the
    recipe's training source) renders each prompt as the build did (see the module docstring). A task with
    no item to score is a UserError (n = 0 is never 0 %).
    """
    path = Path(path)
    protocol = protocol or "lm-eval"
    if protocol not in PROTOCOLS:
        raise UserError(f"unknown protocol {protocol!r}; known: {', '.join(PROTOCOLS)}")
    if not path.is_file():
        raise UserError(f"{path}: task file not found")
    records = _read_records(path)
    fmt = format or infer_format(records[0])
    if fmt is None:
        raise UserError(
            f"{path}: unknown task format (record 0 has keys {sorted(records[0])}); known formats: {', '.join(FORMATS)}"
        )
    if fmt not in FORMATS:
        raise UserError(f"{path}: unknown task format {fmt!r}; known formats: {', '.join(FORMATS)}")
    name = name or path.stem
    item_ids = read_ids(items) if isinstance(items, (str, Path)) else items
    chosen = _select(records, name, path, limit, item_ids)
    if not chosen:
        raise UserError(f"{path}: task {name!r} has no item to score (n = 0)")
    has_image = bool(image_pattern) or fmt == "nlvr" or any(rec.get("image") for _, rec in chosen)
    by_protocol = (protocol != "labels" and fmt in _LANGUAGE_CHOICE_FORMATS and not has_image and kind != "generate"
                   and source is None)
    skipped: list[str] = []
    task_style = None
    if by_protocol:
        loaded = []
        for i, rec in chosen:
            parsed = _parse(fmt, rec, path, i)
            if parsed is None:
                skipped.append(record_id(rec, i))
                continue
            this_style = style or prompt_style(name, str(path), parsed[0])
            task_style = task_style or this_style
            if this_style == "winogrande" and ("_" not in parsed[0].question or len(parsed[0].options) != 2):
                skipped.append(record_id(rec, i))
                continue
            loaded.append(_protocol_item(protocol, this_style, *parsed, record_id(rec, i)))
        if not loaded:
            raise UserError(f"{path}: task {name!r}: none of its {len(chosen)} records parses into a question and "
                            f"options (n = 0)")
        if skipped:
            _warn_skipped(path, name, len(skipped), len(chosen))
        kind = "choice" if protocol == "lm-eval" else "generate"
        return Task(name=name, path=str(path), format=fmt, kind=kind, group=group or "language", items=loaded,
                    extractor="paper" if protocol == "mlan-paper" else "auto", protocol=protocol, style=task_style,
                    skipped=tuple(skipped), max_new_tokens=PAPER_MAX_NEW_TOKENS if protocol == "mlan-paper" else None)
    loaded = [replace(_item(fmt, rec, path, i, images, image_pattern), id=record_id(rec, i)) for i, rec in chosen]
    if source is not None:
        loaded = [_from_source(item, source, rec, i, path) for item, (i, rec) in zip(loaded, chosen)]
    kind = kind or ("choice" if fmt in _CHOICE_FORMATS else "generate")
    if kind == "choice" and any(not it.choices for it in loaded):
        raise UserError(f"{path}: kind 'choice' needs options, but format {fmt!r} has none")
    group = group or ("vision" if any(it.image for it in loaded) else "language")
    extractor = "gsm8k" if fmt == "gsm8k" else "auto"
    task_protocol = ("vision-choice" if group == "vision" else "labels") if kind == "choice" else "generate"
    return Task(name=name, path=str(path), format=fmt, kind=kind, group=group, items=loaded,
                extractor=extractor, protocol=task_protocol)


def _from_source(item: Item, source: SourceSpec, rec: dict, i: int, path: Path) -> Item:
    """The item with its training source's conversation: the prompt the build renders for this record."""
    conv = training_conversation(source, rec, i, str(path), item.image)
    user = next(m for m in conv.messages if m.role == "user")
    return replace(item, prompt=user.text.strip(), conversation=conv)


def _warn_skipped(path: Path, name: str, n_skipped: int, n_records: int) -> None:
    """One line before scoring: records whose options the parser could not find are left out, not scored.

    Inside an `mlan eval --nproc` worker (LOCAL_RANK set) the launcher has already said it."""
    if os.environ.get("LOCAL_RANK") is None:
        progress.warn(f"{path}: {n_skipped} of {n_records} records of task {name!r} do not parse into a question "
                      "and options; they are skipped (not scored)")


def parse_task_arg(arg: str) -> tuple[str | None, str]:
    """`NAME=PATH` or a bare `PATH` (name: the file's stem)."""
    if "=" in arg and not Path(arg).exists():
        name, _, path = arg.partition("=")
        return name.strip() or None, path.strip()
    return None, arg


def _literal(template_text: str, engine: str) -> str:
    """`template_text` as a template of `engine` that renders to itself."""
    if engine == "jinja":
        return "{% raw %}" + template_text + "{% endraw %}"
    return template_text.replace("{", "{{").replace("}", "}}")


def training_conversation(source: SourceSpec, record: dict, index: int, file: str,
                          image: str | None) -> Conversation:
    """The conversation the build makes of an eval record with its training source (the seed's paraphrase).

    The paraphrase, system prompt and image placement are the source's; only the image file is the eval item's
    own (`image`, already resolved), so a record whose training image path does not exist still renders.
    """
    if source.format != "template" or source.template is None:
        raise UserError(f"source {source.name!r} has format {source.format!r}; an eval task's `source` must be "
                        "a `template` source")
    if image is not None:
        template = source.template.model_copy(update={"image": _literal(image, source.template.engine)})
        source = source.model_copy(update={"template": template, "images": str(Path(image).parent),
                                           "image_path": None})
    try:
        conv = to_conversations(source, index, record, file)[0]
    except RecordError as err:
        raise UserError(f"{err} (eval task rendered by training source {source.name!r})") from None
    n_images = 1 if image is not None else 0
    if len(conv.images) != n_images:
        raise UserError(f"{file}, record {index}: training source {source.name!r} renders {len(conv.images)} "
                        f"image(s), the eval item has {n_images}")
    return conv
