"""The two scorers: log-likelihood choice (right-padded batches) and greedy generation (left padding, KV cache).

Scoring knows nothing of model families: the caller passes `inputs`, which gives a batch's image inputs
(pixel values, cross-attention masks) for its ids and image paths.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from mlan.errors import UserError
from mlan.eval.answers import extract_answer, is_correct
from mlan.eval.prompts import prompt_ids
from mlan.eval.tasks import Item, Task

if TYPE_CHECKING:
    from mlan.eval.harness import Loaded

# a batch's ids and its image paths (None: a text batch) → the model's extra forward arguments
ModelInputs = Callable[[torch.Tensor, "list[str] | None"], dict[str, torch.Tensor]]
Progress = Callable[[int], object]


def no_images(ids: torch.Tensor, images: list[str] | None) -> dict[str, torch.Tensor]:
    """The inputs of a text-only batch: none beyond the ids."""
    if images:
        raise UserError("image inputs were asked of a scorer given no image inputs")
    return {}


@torch.no_grad()
def choice_loglikelihoods(lm: Loaded, prompt: list[int], options: list[list[int]], image: str | None = None,
                          batch_size: int = 8, inputs: ModelInputs = no_images) -> list[float]:
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
        kw = inputs(ids, [image] * len(seqs) if image else None)
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


def score_choice(lm: Loaded, task: Task, batch_size: int, progress: Progress,
                 inputs: ModelInputs = no_images) -> tuple[float, list[dict]]:
    """Accuracy (%) by log-likelihood choice; the option batch spans several items for throughput."""
    records = []
    correct = 0
    for item in task.items:
        prompt = prompt_ids(lm, item.prompt, 1 if item.image else 0)
        opts = [_encode_option(lm.tokenizer, c) for c in item.choices]
        lls = choice_loglikelihoods(lm, prompt, opts, item.image, batch_size, inputs)
        pred = item.choices[max(range(len(lls)), key=lls.__getitem__)]
        ok = pred == item.answer
        correct += ok
        records.append({"prediction": pred, "answer": item.answer, "correct": ok, "loglikelihoods": lls})
        progress(1)
    return 100.0 * correct / max(len(task.items), 1), records


@torch.no_grad()
def generate(lm: Loaded, items: list[Item], max_new_tokens: int, inputs: ModelInputs = no_images) -> list[str]:
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
    kw = inputs(ids, images if all(images) else None)
    out = lm.model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=max_new_tokens, do_sample=False,
                            num_beams=1, pad_token_id=pad, eos_token_id=lm.stop_ids or None, use_cache=True, **kw)
    new = out[:, width:]
    texts = []
    for row in new.tolist():
        cut = next((k for k, t in enumerate(row) if t in lm.stop_ids), len(row))
        texts.append(lm.tokenizer.decode(row[:cut], skip_special_tokens=True))
    return texts


def score_generate(lm: Loaded, task: Task, batch_size: int, max_new_tokens: int, progress: Progress,
                   inputs: ModelInputs = no_images) -> tuple[float, list[dict]]:
    """Accuracy (%) by exact match of the extracted answer."""
    records = []
    correct = 0
    items = task.items
    for start in range(0, len(items), batch_size):
        batch = items[start : start + batch_size]
        for item, text in zip(batch, generate(lm, batch, max_new_tokens, inputs)):
            pred = extract_answer(text, item.answer, task.extractor, item.choices)
            ok = is_correct(pred, item.answer)
            correct += ok
            records.append({"generation": text, "prediction": pred, "answer": item.answer, "correct": ok})
        progress(len(batch))
    return 100.0 * correct / max(len(items), 1), records
