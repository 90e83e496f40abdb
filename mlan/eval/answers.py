"""Answers in generations: extraction shaped like the gold answer, normalisation, and exact match.

Numbers compare as numbers (4 = 4.0, 1,000 = 1000); text compares after SQuAD/VQA-style normalisation;
MLAN-style "… the direct answer is: X" is honoured first.
"""
from __future__ import annotations

import math
import re

from mlan.eval.protocols import paper_answer

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")
_DIRECT = re.compile(r"the (?:direct |correct |final )?answer is\s*:?\s*(.+)", re.IGNORECASE | re.DOTALL)


def normalize_number(text: str) -> str | None:
    """'$1,234.00' → '1234'; None when `text` has no number."""
    m = _NUMBER.search(text)
    if not m:
        return None
    s = m.group(0).replace("$", "").replace(",", "")
    try:
        value = float(s)
    except ValueError:
        return None
    if math.isfinite(value) and value == int(value):
        return str(int(value))
    return repr(value)


_WHOLE_NUMBER = re.compile(r"\s*(-?)\$?(\d{1,3}(?:,\d{3})+|\d+)?(\.\d+)?\s*%?\s*\.?\s*")


def as_number(text: str) -> float | None:
    """The value of a text that is only a number ('4', '4.00', '-1,000', '$3.5', '.5'); None otherwise."""
    m = _WHOLE_NUMBER.fullmatch(text)
    if not m or (m.group(2) is None and m.group(3) is None):
        return None
    value = float(m.group(1) + (m.group(2) or "0").replace(",", "") + (m.group(3) or ""))
    return value if math.isfinite(value) else None


def extract_gsm8k(text: str) -> str | None:
    """GSM8K: the number after the last `####`; else after 'the answer is'; else the last number in the text."""
    if "####" in text:
        found = normalize_number(text.rsplit("####", 1)[1])
        if found is not None:
            return found
    m = _DIRECT.search(text)
    if m:
        found = normalize_number(m.group(1))
        if found is not None:
            return found
    numbers = _NUMBER.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


def normalize_text(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (SQuAD/VQA-style normalization)."""
    text = text.lower()
    text = re.sub(r"[^\w\s]", " ", text)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def extract_answer(text: str, gold: str, extractor: str = "auto", choices: tuple[str, ...] = ()) -> str | None:
    """The answer in a generation, shaped like `gold`: a number, yes/no, true/false, an option or free text.

    MLAN-style "… the direct answer is: X" is honoured first; None when nothing answer-like is found.
    """
    if extractor == "gsm8k":
        return extract_gsm8k(text)
    if extractor == "paper":  # mlan-paper: the generation continues `The best answer is "`
        return paper_answer(text, choices)
    m = _DIRECT.search(text)
    span = m.group(1) if m else text
    span = span.strip().split("\n")[0] if m else span.strip()
    g = gold.strip().lower()
    if g in ("yes", "no") or g in ("true", "false"):
        pair = ("yes", "no") if g in ("yes", "no") else ("true", "false")
        found = re.search(rf"\b({pair[0]}|{pair[1]})\b", span.lower())
        return found.group(1) if found else None
    if re.fullmatch(r"answer\d+", g):
        found = re.search(r"answer\s*(\d+)", span.lower())
        return f"answer{found.group(1)}" if found else None
    if as_number(g) is not None:
        return normalize_number(span)
    if choices:
        norm = normalize_text(span)
        for c in sorted(choices, key=len, reverse=True):
            if normalize_text(c) and re.search(rf"\b{re.escape(normalize_text(c))}\b", norm):
                return c
    span = span.strip().rstrip(".").strip()
    return span or None


def is_correct(pred: str | None, gold: str) -> bool:
    """Exact match after normalization; numbers compare as numbers (4 = 4.0 = 4.00, 1,000 = 1000)."""
    if pred is None:
        return False
    p, g = as_number(pred), as_number(gold)
    if p is not None and g is not None:
        return math.isclose(p, g, rel_tol=1e-9, abs_tol=1e-9)
    return normalize_text(pred) == normalize_text(gold)
