"""Scoring protocols for language multiple-choice files: what the model is shown and what is scored.

- `lm-eval`: lm-evaluation-harness 0.4.13's zero-shot log-likelihood protocol, prompt for prompt. Each option is
  a continuation (target delimiter " ") after the task's `doc_to_text`: ARC and the generic cloze prompt
  `Question: {question}\\nAnswer:`, OpenBookQA `{question_stem}`, PIQA `Question: {goal}\\nAnswer:`, BoolQ
  `{passage}\\nQuestion: {question}?\\nAnswer:` with options `no` / `yes`, WinoGrande partial scoring (one context
  per option: the sentence up to the blank with the option filled in; the scored continuation is the rest).
  BoolQ and WinoGrande report `acc` only, as lm-eval's own task YAMLs do.
- `mlan-paper`: MLAN's generative protocol: the question, `Choose the best option from below:` and lettered
  options in the chat template, the assistant turn opened with `The best answer is "`, greedy, exact match.
- `labels`: the LLM-Adapters rendering as it is (options listed in the prompt, the model picks `answerK`).

The LLM-Adapters files put the question and its options inside `instruction`; `parse_adapters` takes them
apart (the option markers are the labels of the `Answer format: a/b/…` line), so any choice file in that
rendering, seen or not, has question and option texts.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

Protocol = Literal["lm-eval", "mlan-paper", "labels"]
PROTOCOLS: tuple[str, ...] = ("lm-eval", "mlan-paper", "labels")
PROMPT_STYLES = ("arc", "openbookqa", "piqa", "boolq", "winogrande", "cloze")
PAPER_SUFFIX = "Choose the best option from below:"
PAPER_PREFIX = 'The best answer is "'
PAPER_MAX_NEW_TOKENS = 20
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

_FORMAT_LINE = re.compile(r"\s*Answer format:\s*([^\n]+?)\s*$")
_LEADING_INSTRUCTION = re.compile(r"^\s*Please [^:\n]*?:\s*")


@dataclass(frozen=True)
class Parsed:
    """One LLM-Adapters choice record taken apart: the question, the option texts, the gold index."""

    question: str
    options: tuple[str, ...]
    gold: int
    labels: tuple[str, ...]  # the `Answer format` labels (answer1, solution2, option1, true, …)


@dataclass(frozen=True)
class Cloze:
    """An item as lm-evaluation-harness scores it: one (context, continuation) request per option.

    `option_texts` are lm-eval's `doc_to_choice` strings (acc_norm divides by their length); `norm` is False
    where lm-eval's task reports `acc` only (WinoGrande's partial scoring, BoolQ).
    """

    requests: tuple[tuple[str, str], ...]
    option_texts: tuple[str, ...]
    gold: int
    norm: bool = True


def parse_adapters(instruction: str, answer: str) -> Parsed | None:
    """Question and option texts of an LLM-Adapters choice instruction; None when it does not parse.

    The labels come from the last `Answer format:` line; each option is the text after `Label:` (case-
    insensitive) up to the next label; the question is what comes before the first label, less a leading
    `Please …:` instruction. true/false labels with no listed options are a yes/no question (BoolQ).
    """
    lines = instruction.rstrip().split("\n")
    m = _FORMAT_LINE.fullmatch(lines[-1]) if lines else None
    body = "\n".join(lines[:-1])
    if m is None:  # WinoGrande's rendering puts the format on the options' line
        m = re.search(r"\s*Answer format:\s*([^\n]+?)\s*$", instruction)
        if m is None:
            return None
        body = instruction[: m.start()]
    labels = tuple(x.strip() for x in m.group(1).split("/") if x.strip())
    answer = answer.strip()
    if not labels or answer not in labels:
        return None
    if [x.lower() for x in labels] == ["true", "false"]:
        question = _LEADING_INSTRUCTION.sub("", body).strip()
        return Parsed(question, ("no", "yes"), 1 if answer.lower() == "true" else 0, labels) if question else None
    marks = [re.search(rf"(?<![\w]){re.escape(lab)}\s*:\s*", body, re.IGNORECASE) for lab in labels]
    if any(x is None for x in marks):
        return None
    starts = [x.start() for x in marks]
    if starts != sorted(starts):
        return None
    options = []
    for k, mk in enumerate(marks):
        end = starts[k + 1] if k + 1 < len(marks) else len(body)
        options.append(body[mk.end() : end].strip())
    question = _LEADING_INSTRUCTION.sub("", body[: starts[0]]).strip()
    if not question or any(not o for o in options):
        return None
    return Parsed(question, tuple(options), labels.index(answer), labels)


def prompt_style(name: str, path: str, parsed: Parsed) -> str:
    """Which lm-eval task prompt an item gets: from the task's name or file name, else from its shape."""
    hint = f"{name} {path}".lower().replace("-", "").replace("_", "")
    for style, keys in (("openbookqa", ("openbookqa", "obqa")), ("winogrande", ("winogrande",)),
                        ("piqa", ("piqa",)), ("boolq", ("boolq",)), ("arc", ("arc",))):
        if any(k in hint for k in keys):
            if style == "winogrande" and ("_" not in parsed.question or len(parsed.options) != 2):
                break
            return style
    if parsed.labels and sorted(x.lower() for x in parsed.labels) == ["false", "true"]:
        return "boolq"
    return "cloze"


def cloze(style: str, parsed: Parsed, passage: str = "") -> Cloze:
    """lm-eval's requests for one item (see the module docstring); `passage` is BoolQ's (empty in our files)."""
    opts = parsed.options
    if style == "winogrande":
        idx = parsed.question.index("_")
        contexts = tuple(parsed.question[:idx] + o for o in opts)
        target = parsed.question[idx + 1 :].strip()
        return Cloze(tuple((c, " " + target) for c in contexts), contexts, parsed.gold, norm=False)
    if style == "openbookqa":
        context = parsed.question
    elif style == "boolq":  # LLM-Adapters appended the "?" that lm-eval's prompt adds: drop it
        question = parsed.question.removesuffix("?")
        context = f"{passage}\nQuestion: {question}?\nAnswer:"
        return Cloze(tuple((context, " " + o) for o in opts), opts, parsed.gold, norm=False)  # lm-eval: acc only
    else:  # arc, piqa and the generic cloze prompt
        context = f"Question: {parsed.question}\nAnswer:"
    return Cloze(tuple((context, " " + o) for o in opts), opts, parsed.gold)


def chat_cloze(item: Cloze, render_user) -> Cloze:
    """lm-eval's `--apply_chat_template`: the context becomes a user turn with the generation prompt and the
    target delimiter is dropped (lm-eval uses "" when the task has no gen_prefix)."""
    reqs = tuple((render_user(ctx), cont.removeprefix(" ")) for ctx, cont in item.requests)
    return Cloze(reqs, item.option_texts, item.gold, item.norm)


def paper_prompt(parsed: Parsed) -> str:
    """The MLAN paper's user text: the question, the instruction and the lettered options."""
    lines = [f"{parsed.question} {PAPER_SUFFIX}"]
    lines += [f"{LETTERS[k]}. {o}" for k, o in enumerate(parsed.options)]
    return "\n".join(lines)


def paper_answer(generation: str, options: tuple[str, ...]) -> str | None:
    """The option a `The best answer is "…` generation names: a letter or an option's text; None otherwise."""
    text = generation.split('"', 1)[0].strip().rstrip(".").strip()
    if len(text) == 1 and text.upper() in LETTERS[: len(options)]:
        return options[LETTERS.index(text.upper())]
    m = re.match(r"^([A-Z])[.):]\s", text + " ")
    if m and m.group(1) in LETTERS[: len(options)]:
        return options[LETTERS.index(m.group(1))]
    low = text.lower()
    for o in options:
        if low == o.strip().lower():
            return o
    return None


def lm_eval_doc(style: str, parsed: Parsed, passage: str = "") -> dict:
    """The record lm-evaluation-harness's own task YAML for `style` reads (the Hub's field names), so a local
    JSON file of these docs is scored by lm-eval exactly as `cloze` scores the item."""
    labels = [str(k + 1) for k in range(len(parsed.options))]
    if style in ("arc", "cloze"):
        return {"question": parsed.question, "choices": {"text": list(parsed.options), "label": labels},
                "answerKey": labels[parsed.gold]}
    if style == "openbookqa":
        return {"question_stem": parsed.question, "choices": {"text": list(parsed.options), "label": labels},
                "answerKey": labels[parsed.gold]}
    if style == "piqa":
        return {"goal": parsed.question, "sol1": parsed.options[0], "sol2": parsed.options[1], "label": parsed.gold}
    if style == "boolq":
        question = parsed.question.removesuffix("?")
        return {"passage": passage, "question": question, "label": parsed.gold}
    if style == "winogrande":
        return {"sentence": parsed.question, "option1": parsed.options[0], "option2": parsed.options[1],
                "answer": str(parsed.gold + 1)}
    raise ValueError(f"unknown prompt style {style!r}")
