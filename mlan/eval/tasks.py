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
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mlan.errors import UserError
from mlan.sources.images import ImageContext, resolve_path
from mlan.sources.records import RecordError

Kind = Literal["choice", "generate"]
Group = Literal["language", "vision"]


@dataclass(frozen=True)
class Item:
    """One question: the user message, the options (choice tasks) and the gold answer."""

    prompt: str
    answer: str
    choices: tuple[str, ...] = ()
    image: str | None = None  # a local image path, resolved


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
) -> Task:
    """Read a benchmark file; format, kind and group are inferred unless given."""
    path = Path(path)
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
    if limit is not None:
        records = records[:limit]
    items = [_item(fmt, rec, path, i, images, image_pattern) for i, rec in enumerate(records)]
    kind = kind or ("choice" if fmt in _CHOICE_FORMATS else "generate")
    if kind == "choice" and any(not it.choices for it in items):
        raise UserError(f"{path}: kind 'choice' needs options, but format {fmt!r} has none")
    group = group or ("vision" if any(it.image for it in items) else "language")
    extractor = "gsm8k" if fmt == "gsm8k" else "auto"
    return Task(name=name or path.stem, path=str(path), format=fmt, kind=kind, group=group, items=items,
                extractor=extractor)


def parse_task_arg(arg: str) -> tuple[str | None, str]:
    """`NAME=PATH` or a bare `PATH` (name: the file's stem)."""
    if "=" in arg and not Path(arg).exists():
        name, _, path = arg.partition("=")
        return name.strip() or None, path.strip()
    return None, arg
