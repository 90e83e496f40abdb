"""`mlan eval`: zero-shot scoring of a causal LM, LLaVA or Mllama model directory on benchmark files.

Two scorers: log-likelihood choice (the option whose tokens have the highest summed log-probability
after the prompt; batched, right padding) and greedy generation (batched, left padding, KV cache) with
answer extraction and exact match. Prompts use the Llama-3 chat format when the tokenizer has its
header tokens (images first in the user turn, as mlan renders LLaVA-style data), else the tokenizer's
own chat_template. Accuracies are percentages.
"""
from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mlan.errors import UserError
from mlan.eval.forgetting import forgetting
from mlan.eval.tasks import Item, Task, load_task, parse_task_arg
from mlan.weights import check_model_dir

# ---------------------------------------------------------------- answer extraction
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


# ---------------------------------------------------------------- model and prompts
@dataclass
class Loaded:
    """A model with what its prompts and images need."""

    model: torch.nn.Module
    tokenizer: Any
    family: str  # "llava" | "mllama" | "text"
    image_token_id: int | None
    image_tokens: int  # in-sequence positions per image
    image_size: int
    max_tiles: int
    stop_ids: list[int]


def load_model(path: str) -> Loaded:
    """A model folder (save_pretrained) or hub id → model in eval mode + tokenizer; UserError names the path."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from mlan.pretrained import resolve_model_path

    path = resolve_model_path(path)  # a named offline base (e.g. smollm2-135m-instruct) → its converted folder
    p = Path(path)
    if p.exists() and not (p / "config.json").is_file():
        raise UserError(f"{path}: not a model directory (no config.json)")
    check_model_dir(path)  # safetensors only, headers sound: never unpickle, never trust a length field
    try:
        cfg = AutoConfig.from_pretrained(path)
    except Exception as err:  # noqa: BLE001 - transformers raises many types for a bad folder/id
        raise UserError(f"{path}: not a model directory or hub id ({type(err).__name__}: {str(err).splitlines()[0]})") from None
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as err:  # noqa: BLE001
        raise UserError(f"{path}: the model has no usable tokenizer ({type(err).__name__}: {str(err).splitlines()[0]})") from None
    if cfg.model_type == "llava":
        from transformers import LlavaForConditionalGeneration

        model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32, use_safetensors=True)
        vc = cfg.vision_config
        n = int(getattr(cfg, "image_seq_length", 0) or (vc.image_size // vc.patch_size) ** 2)
        loaded = Loaded(model, tok, "llava", int(cfg.image_token_id), n, int(vc.image_size), 1, [])
    elif cfg.model_type == "mllama":
        from transformers import MllamaForConditionalGeneration

        from mlan.families.modeling import reference_cross_attention

        model = reference_cross_attention(MllamaForConditionalGeneration.from_pretrained(path, dtype=torch.float32, use_safetensors=True))
        vc = cfg.vision_config
        loaded = Loaded(model, tok, "mllama", int(cfg.image_token_id), 1, int(vc.image_size), int(vc.max_num_tiles), [])
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True)
        except Exception as err:  # noqa: BLE001
            raise UserError(f"{path}: not a causal LM ({type(err).__name__}: {str(err).splitlines()[0]})") from None
        loaded = Loaded(model, tok, "text", None, 0, 0, 1, [])
    model.eval()
    stops = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    for t in ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"):
        i = tok.convert_tokens_to_ids(t)
        if isinstance(i, int) and i != tok.unk_token_id and tok.convert_ids_to_tokens(i) == t:
            stops.add(i)
    loaded.stop_ids = sorted(s for s in stops if s is not None)
    return loaded


def _has_llama3_headers(tok) -> bool:
    return all(tok.convert_tokens_to_ids(t) not in (None, tok.unk_token_id)
               and tok.convert_ids_to_tokens(tok.convert_tokens_to_ids(t)) == t
               for t in ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"))


def prompt_ids(lm: Loaded, text: str, n_images: int = 0) -> list[int]:
    """The user turn and the assistant header, tokenized as mlan's llama3 template renders a document."""
    tok = lm.tokenizer
    image_ids: list[int] = []
    if n_images:
        if lm.image_token_id is None:
            raise UserError(f"{tok.name_or_path}: a text-only model cannot be evaluated on image tasks")
        image_ids = [lm.image_token_id] * (lm.image_tokens * n_images)
    text = text.strip()
    if _has_llama3_headers(tok):
        enc = lambda s: tok.encode(s, add_special_tokens=False)
        tid = tok.convert_tokens_to_ids
        head = lambda role: [tid("<|start_header_id|>"), *enc(role), tid("<|end_header_id|>"), *enc("\n\n")]
        body = image_ids + enc(("\n" + text) if image_ids else text)
        return [tid("<|begin_of_text|>"), *head("user"), *body, tid("<|eot_id|>"), *head("assistant")]
    if tok.chat_template:
        marker = "\x00IMG\x00"
        rendered = tok.apply_chat_template([{"role": "user", "content": (marker + "\n" if image_ids else "") + text}],
                                           tokenize=False, add_generation_prompt=True)
        before, _, after = rendered.partition(marker)
        ids = tok.encode(before, add_special_tokens=False)
        return ids + image_ids + tok.encode(after, add_special_tokens=False) if image_ids else ids
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    return bos + image_ids + tok.encode(("\n" if image_ids else "") + text + "\n", add_special_tokens=False)


def _open_image(path: str):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def image_inputs(lm: Loaded, images: list[str]) -> dict[str, torch.Tensor]:
    """Model inputs for one image per sequence (same preprocessing as mlan's training loader)."""
    from mlan.data.images import llava_pixel_values, mllama_images

    pil = [_open_image(p) for p in images]
    if lm.family == "llava":
        return {"pixel_values": llava_pixel_values(pil, lm.image_size)}
    mi = mllama_images(pil, lm.image_size, lm.max_tiles)
    return {
        "pixel_values": mi.pixel_values[:, None],  # (batch, 1 image, tiles, 3, T, T)
        "aspect_ratio_ids": mi.aspect_ratio_ids[:, None],
        "aspect_ratio_mask": mi.aspect_ratio_mask[:, None],
        "_num_tiles": torch.tensor(mi.num_tiles),
    }


def _mllama_cross_mask(ids: torch.Tensor, image_token_id: int, num_tiles: torch.Tensor, max_tiles: int) -> torch.Tensor:
    """(batch, seq, 1, max_tiles): tokens from the image token on see the image's valid tiles."""
    b, n = ids.shape
    mask = torch.zeros(b, n, 1, max_tiles, dtype=torch.long)
    for i in range(b):
        pos = (ids[i] == image_token_id).nonzero()
        if len(pos):
            mask[i, int(pos[0]):, 0, : int(num_tiles[i])] = 1
    return mask


def _forward_kwargs(lm: Loaded, ids: torch.Tensor, images: list[str] | None) -> dict[str, torch.Tensor]:
    if not images:
        return {}
    kw = image_inputs(lm, images)
    if lm.family == "mllama":
        kw["cross_attention_mask"] = _mllama_cross_mask(ids, lm.image_token_id, kw.pop("_num_tiles"), lm.max_tiles)
    return kw


# ---------------------------------------------------------------- scorers
@torch.no_grad()
def choice_loglikelihoods(lm: Loaded, prompt: list[int], options: list[list[int]], image: str | None = None,
                          batch_size: int = 8) -> list[float]:
    """Summed log-probability of each option's tokens after the prompt (right-padded batches)."""
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    out: list[float] = []
    for start in range(0, len(options), batch_size):
        chunk = options[start : start + batch_size]
        seqs = [prompt + o for o in chunk]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            attn[i, : len(s)] = 1
        kw = _forward_kwargs(lm, ids, [image] * len(seqs) if image else None)
        # only the positions that predict option tokens: the shared prompt ends at len(prompt) - 1
        keep = torch.arange(len(prompt) - 1, width - 1)
        try:
            logits = lm.model(input_ids=ids, attention_mask=attn, use_cache=False, logits_to_keep=keep, **kw).logits
        except TypeError:  # a model class without logits_to_keep
            logits = lm.model(input_ids=ids, attention_mask=attn, use_cache=False, **kw).logits[:, keep]
        for i, o in enumerate(chunk):
            logp = torch.log_softmax(logits[i, : len(o)].float(), dim=-1)
            out.append(float(logp.gather(1, torch.tensor(o)[:, None]).sum()))
    return out


def _encode_option(tok, option: str) -> list[int]:
    ids = tok.encode(option.strip(), add_special_tokens=False)
    if not ids:
        raise UserError(f"option {option!r} tokenizes to nothing")
    return ids


def score_choice(lm: Loaded, task: Task, batch_size: int, progress) -> tuple[float, list[dict]]:
    """Accuracy (%) by log-likelihood choice; the option batch spans several items for throughput."""
    records = []
    correct = 0
    for item in task.items:
        prompt = prompt_ids(lm, item.prompt, 1 if item.image else 0)
        opts = [_encode_option(lm.tokenizer, c) for c in item.choices]
        lls = choice_loglikelihoods(lm, prompt, opts, item.image, batch_size)
        pred = item.choices[max(range(len(lls)), key=lls.__getitem__)]
        ok = pred == item.answer
        correct += ok
        records.append({"prediction": pred, "answer": item.answer, "correct": ok, "loglikelihoods": lls})
        progress(1)
    return 100.0 * correct / max(len(task.items), 1), records


@torch.no_grad()
def generate(lm: Loaded, items: list[Item], max_new_tokens: int) -> list[str]:
    """Greedy continuations of a batch of prompts (left padding, KV cache)."""
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else lm.stop_ids[0]
    prompts = [prompt_ids(lm, it.prompt, 1 if it.image else 0) for it in items]
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        attn[i, width - len(p):] = 1
    images = [it.image for it in items]
    if any(images) and not all(images):
        raise UserError("a generation batch mixes image and text items")
    kw = _forward_kwargs(lm, ids, images if all(images) else None)
    out = lm.model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=max_new_tokens, do_sample=False,
                            num_beams=1, pad_token_id=pad, eos_token_id=lm.stop_ids or None, use_cache=True, **kw)
    new = out[:, width:]
    texts = []
    for row in new.tolist():
        cut = next((k for k, t in enumerate(row) if t in lm.stop_ids), len(row))
        texts.append(lm.tokenizer.decode(row[:cut], skip_special_tokens=True))
    return texts


def score_generate(lm: Loaded, task: Task, batch_size: int, max_new_tokens: int, progress) -> tuple[float, list[dict]]:
    """Accuracy (%) by exact match of the extracted answer."""
    records = []
    correct = 0
    items = task.items
    for start in range(0, len(items), batch_size):
        batch = items[start : start + batch_size]
        for item, text in zip(batch, generate(lm, batch, max_new_tokens)):
            pred = extract_answer(text, item.answer, task.extractor, item.choices)
            ok = is_correct(pred, item.answer)
            correct += ok
            records.append({"generation": text, "prediction": pred, "answer": item.answer, "correct": ok})
        progress(len(batch))
    return 100.0 * correct / max(len(items), 1), records


# ---------------------------------------------------------------- the run
def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def evaluate_tasks(lm: Loaded, tasks: list[Task], batch_size: int = 8, max_new_tokens: int = 64,
                   keep_records: bool = False) -> dict:
    """Score loaded tasks; returns the results dict (see `evaluate`)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    results: dict[str, Any] = {"tasks": {}}
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=None, transient=not sys.stderr.isatty(), disable=not sys.stderr.isatty()) as bar:
        for task in tasks:
            if task.group == "vision" and lm.family == "text":
                raise UserError(f"{task.path}: image task, but the model is a text-only causal LM")
            tid = bar.add_task(f"eval {task.name}", total=len(task.items))
            step = lambda n, tid=tid: bar.advance(tid, n)
            if task.kind == "choice":
                acc, records = score_choice(lm, task, batch_size, step)
            else:
                acc, records = score_generate(lm, task, batch_size, max_new_tokens, step)
            entry = {"accuracy": acc, "n": len(task.items), "group": task.group, "kind": task.kind,
                     "format": task.format, "path": task.path}
            if keep_records:
                entry["records"] = records
            results["tasks"][task.name] = entry
    for group in ("language", "vision"):
        accs = [t["accuracy"] for t in results["tasks"].values() if t["group"] == group]
        results[f"{group}_avg"] = _mean(accs)
    return results


def _as_task(spec: Any, limit: int | None, images: str | None, image_pattern: str | None = None) -> Task:
    if isinstance(spec, Task):
        return spec
    if isinstance(spec, (str, Path)):
        name, path = parse_task_arg(str(spec))
        return load_task(path, name, images=images, limit=limit, image_pattern=image_pattern)
    # an EvalTaskSpec (recipe) or a dict with its keys
    get = (lambda k: getattr(spec, k, None)) if not isinstance(spec, dict) else spec.get
    return load_task(get("path"), get("name"), kind=get("kind"), format=get("format"), group=get("group"),
                     images=get("images") or images, limit=get("limit") or limit,
                     image_pattern=get("image_pattern") or image_pattern)


def evaluate(model_path: str, tasks: list, batch_size: int = 8, limit: int | None = None,
             max_new_tokens: int = 64, images: str | None = None, reference: str | None = None,
             keep_records: bool = False, image_pattern: str | None = None) -> dict:
    """Evaluate a model directory on task files / NAME=PATH strings / recipe task specs.

    Returns {"model", "tasks": {name: {accuracy (%), n, group, kind, format, path}}, "language_avg",
    "vision_avg"} plus "forgetting" ({omega, reference_omega, delta} per group) when `reference` is a results file.
    """
    loaded_tasks = [_as_task(t, limit, images, image_pattern) for t in tasks]  # check every file before loading the model
    names = [t.name for t in loaded_tasks]
    if len(set(names)) != len(names):
        raise UserError(f"task names must be unique; got {names} (use NAME=PATH)")
    lm = load_model(str(model_path))
    results = {"model": str(model_path), **evaluate_tasks(lm, loaded_tasks, batch_size, max_new_tokens, keep_records)}
    if reference:
        ref_path = Path(reference)
        if not ref_path.is_file():
            raise UserError(f"{reference}: reference results file not found")
        try:
            ref = json.loads(ref_path.read_text())
        except json.JSONDecodeError as err:
            raise UserError(f"{reference}: not a results JSON file ({err.msg})") from None
        results["forgetting"] = forgetting(ref, results, str(reference))
    return results


def format_table(results: dict) -> str:
    """A small plain-text table of the results for the terminal."""
    lines = [f"{'task':<28} {'group':<9} {'kind':<9} {'n':>6} {'acc %':>7}"]
    for name, t in results["tasks"].items():
        lines.append(f"{name:<28} {t['group']:<9} {t['kind']:<9} {t['n']:>6} {t['accuracy']:>7.2f}")
    for group in ("language", "vision"):
        if results.get(f"{group}_avg") is not None:
            lines.append(f"{group + '_avg':<55} {results[group + '_avg']:>7.2f}")
    fg = results.get("forgetting")
    if fg:
        for group, d in fg["groups"].items():
            lines.append(f"forgetting Δ {group:<9} ω(ref) {d['reference_omega']:.2f} ω {d['omega']:.2f} "
                         f"Δ {d['delta']:+.2f}")
    return "\n".join(lines)
