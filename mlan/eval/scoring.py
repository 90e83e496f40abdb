"""The scorers: lm-eval cloze log-likelihoods (each context once, its options as continuations on the context's
KV cache, batched across items), log-likelihood choice of the labels/vision protocols (right-padded batches) and
greedy generation (left padding, KV cache).

Scoring knows nothing of model families: the caller passes `inputs`, which gives a batch's image inputs
(pixel values, cross-attention masks) for its ids and image paths.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from mlan.errors import UserError
from mlan.eval.answers import extract_answer, is_correct
from mlan.eval.loading import Loaded, ModelInputs
from mlan.eval.prompts import item_prompt_ids
from mlan.eval.protocols import Cloze
from mlan.eval.tasks import Item, Task
from mlan.families.registry import family_plugin

Progress = Callable[[int], object]


def no_images(ids: torch.Tensor, images: list[str] | None) -> dict[str, torch.Tensor]:
    """The inputs of a text-only batch: none beyond the ids."""
    if images:
        raise UserError("image inputs were asked of a scorer given no image inputs")
    return {}


def _logits(lm: Loaded, **inputs: object) -> tuple[torch.Tensor, object]:
    """One forward with every tensor input on the model's device (a GPU when eval runs on one); the logits come
    back on the CPU, where the log-probabilities are summed, with the model's cache (or None)."""
    device = next(lm.model.parameters()).device
    out = lm.model(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()})
    return out.logits.cpu(), getattr(out, "cache", None)


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
            logits, _ = _logits(lm, input_ids=ids, attention_mask=attn, use_cache=False, logits_to_keep=keep, **kw)
        except TypeError:  # a model class without logits_to_keep
            logits = _logits(lm, input_ids=ids, attention_mask=attn, use_cache=False, **kw)[0][:, keep]
        for i, o in enumerate(chunk):
            logp = torch.log_softmax(logits[i, : len(o)].float(), dim=-1)
            out.append(float(logp.gather(1, torch.tensor(o)[:, None]).sum()))
    return out


# ---------------------------------------------------------------- lm-eval cloze scoring
def _prefix_token_id(tok) -> int:
    """lm-eval's prefix token (the context of an empty context): BOS, else EOS."""
    return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id


def _tok_encode(tok, text: str) -> list[int]:
    """lm-eval's HFLM.tok_encode with add_bos_token unset: the tokenizer's default special tokens, none when
    the text already starts with the prefix (BOS) token's text (a chat-rendered context)."""
    bos = tok.decode(_prefix_token_id(tok))
    if bos and text.startswith(bos):
        return tok.encode(text, add_special_tokens=False)
    return tok.encode(text)


def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's `_encode_pair` for a causal model: the context's trailing whitespace moves to the continuation;
    the continuation's tokens are those of context + continuation after the context's own tokens."""
    if not context:
        cont = tok.encode(continuation, add_special_tokens=False)
        prefix = _prefix_token_id(tok)
        return ([prefix], cont) if cont and cont[0] != prefix else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = _tok_encode(tok, context + continuation)
    ctx = _tok_encode(tok, context)
    return ctx, whole[len(ctx) :]


@dataclass
class _Group:
    """One distinct context of an item and the continuations scored after it."""

    context: list[int]
    continuations: list[list[int]]
    slots: list[tuple[int, int]]  # (item index, option index) of each continuation


def _groups(tok, items: list[Cloze]) -> list[_Group]:
    """Requests grouped by their tokenized context (WinoGrande: one group per option)."""
    groups: list[_Group] = []
    for i, item in enumerate(items):
        mine: dict[tuple[int, ...], _Group] = {}
        for k, (ctx, cont) in enumerate(item.requests):
            ctx_ids, cont_ids = encode_pair(tok, ctx, cont)
            if not cont_ids:
                raise UserError(f"option {cont!r} tokenizes to nothing after its context")
            g = mine.get(tuple(ctx_ids))
            if g is None:
                g = mine[tuple(ctx_ids)] = _Group(ctx_ids, [], [])
                groups.append(g)
            g.continuations.append(cont_ids)
            g.slots.append((i, k))
    return groups


def _max_length(lm: Loaded) -> int:
    cfg = getattr(lm.model.config, "text_config", None) or lm.model.config
    return int(getattr(cfg, "max_position_embeddings", None) or 2048)


def _sum_logprobs(logits: torch.Tensor, rows: list[tuple[int, int, list[int]]]) -> list[float]:
    """Per (row, first position, target tokens): the summed log-softmax (fp32, as lm-eval) of the targets."""
    out = []
    for row, start, target in rows:
        logp = torch.log_softmax(logits[row, start : start + len(target)].float(), dim=-1)
        out.append(float(logp.gather(1, torch.tensor(target)[:, None]).sum()))
    return out


@torch.no_grad()
def _score_full(lm: Loaded, group: _Group, max_length: int) -> list[float]:
    """lm-eval's own way for one context: each (context + continuation)[:-1], left-truncated to the model's
    length, one forward per continuation (used for one-token contexts and over-long requests)."""
    out = []
    for cont in group.continuations:
        seq = (group.context + cont)[-(max_length + 1) :][:-1]
        logits, _ = _logits(lm, input_ids=torch.tensor([seq]), use_cache=False)
        out += _sum_logprobs(logits, [(0, len(seq) - len(cont), cont)])
    return out


@torch.no_grad()
def _score_cached(lm: Loaded, batch: list[_Group], pad: int) -> list[list[float]]:
    """A batch of contexts run once (all but their last token, into a KV cache); every continuation then runs
    on its context's cache: [last context token] + continuation[:-1] predicts the continuation."""
    prefixes = [g.context[:-1] for g in batch]
    width = max(len(p) for p in prefixes)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prefixes):
        ids[r, : len(p)] = torch.tensor(p)
        mask[r, : len(p)] = 1
    _, cache = _logits(lm, input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
    owner = [r for r, g in enumerate(batch) for _ in g.continuations]
    suffixes = [[g.context[-1], *c[:-1]] for g in batch for c in g.continuations]
    targets = [c for g in batch for c in g.continuations]
    cache.reorder_cache(torch.tensor(owner, device=next(lm.model.parameters()).device))
    swidth = max(len(s) for s in suffixes)
    sids = torch.full((len(suffixes), swidth), pad, dtype=torch.long)
    smask = torch.zeros_like(sids)
    for r, sfx in enumerate(suffixes):
        sids[r, : len(sfx)] = torch.tensor(sfx)
        smask[r, : len(sfx)] = 1
    lengths = torch.tensor([len(prefixes[o]) for o in owner])
    positions = lengths[:, None] + torch.arange(swidth)[None, :]
    logits, _ = _logits(lm, input_ids=sids, attention_mask=torch.cat([mask[owner], smask], dim=1),
                        position_ids=positions, cache=cache, use_cache=True)
    flat = _sum_logprobs(logits, [(r, 0, t) for r, t in enumerate(targets)])
    out, k = [], 0
    for g in batch:
        out.append(flat[k : k + len(g.continuations)])
        k += len(g.continuations)
    return out


def cloze_loglikelihoods(lm: Loaded, items: list[Cloze], batch_size: int = 8,
                         progress: Progress = lambda n: None) -> list[list[float]]:
    """Each item's options' summed log-likelihoods, equal per item to lm-evaluation-harness's HF backend.

    Tokens are built as lm-eval builds them (`encode_pair`); each distinct context is computed once and its
    options scored as continuations on its KV cache, `batch_size` contexts per forward, longest first.
    """
    tok = lm.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    groups = _groups(tok, items)
    max_length = _max_length(lm)
    out: list[list[float | None]] = [[None] * len(it.requests) for it in items]
    done_items: set[int] = set()

    def finish(group: _Group, lls: list[float]) -> None:
        for (i, k), ll in zip(group.slots, lls):
            out[i][k] = ll
        for i in {i for i, _ in group.slots}:
            if i not in done_items and all(v is not None for v in out[i]):
                done_items.add(i)
                progress(1)

    cached, single = [], []
    on_cache = lm.family is None or family_plugin(lm.family).scores_on_context_cache
    for g in groups:
        fits = len(g.context) + max(len(c) for c in g.continuations) <= max_length + 1
        (cached if len(g.context) > 1 and fits and on_cache else single).append(g)
    cached.sort(key=lambda g: -(len(g.context) + max(len(c) for c in g.continuations)))
    for start in range(0, len(cached), batch_size):
        batch = cached[start : start + batch_size]
        for g, lls in zip(batch, _score_cached(lm, batch, pad)):
            finish(g, lls)
    for g in single:
        finish(g, _score_full(lm, g, max_length))
    return out  # type: ignore[return-value]


def argmax_first(values: list[float]) -> int:
    """The index of the largest value, the first on ties (numpy.argmax, as lm-eval picks)."""
    return max(range(len(values)), key=lambda k: (values[k], -k))


def score_cloze(lm: Loaded, task: Task, batch_size: int, progress: Progress) -> list[dict]:
    """The lm-eval protocol's per-item records: acc (summed log-likelihood) and, unless WinoGrande's partial
    scoring, acc_norm (log-likelihood / the option text's length: lm-eval divides by len(str), characters)."""
    clozes = [it.cloze for it in task.items]
    if any(c is None for c in clozes):
        raise UserError(f"{task.path}: task {task.name!r} has items without lm-eval requests")
    lls_all = cloze_loglikelihoods(lm, clozes, batch_size, progress)
    records = []
    for item, cz, lls in zip(task.items, clozes, lls_all):
        pred = argmax_first(lls)
        rec = {"task": task.name, "id": item.id, "gold": item.choices[cz.gold], "prediction": item.choices[pred],
               "correct": pred == cz.gold, "loglik": lls}
        if cz.norm:
            pred_norm = argmax_first([ll / len(t) for ll, t in zip(lls, cz.option_texts)])
            rec["prediction_norm"] = item.choices[pred_norm]
            rec["correct_norm"] = pred_norm == cz.gold
        records.append(rec)
    return records


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
        prompt = item_prompt_ids(lm, item)
        opts = [_encode_option(lm.tokenizer, c) for c in item.choices]
        lls = choice_loglikelihoods(lm, prompt, opts, item.image, batch_size, inputs)
        pred = item.choices[argmax_first(lls)]
        ok = pred == item.answer
        correct += ok
        records.append({"task": task.name, "id": item.id, "gold": item.answer, "prediction": pred, "correct": ok,
                        "loglik": lls})
        progress(1)
    return 100.0 * correct / max(len(task.items), 1), records


@torch.no_grad()
def generate(lm: Loaded, items: list[Item], max_new_tokens: int, inputs: ModelInputs = no_images) -> list[str]:
    """Greedy continuations of a batch of prompts (left padding, KV cache)."""
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else lm.stop_ids[0]
    prompts = [item_prompt_ids(lm, it)
               + (lm.tokenizer.encode(it.response_prefix, add_special_tokens=False) if it.response_prefix else [])
               for it in items]
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        attn[i, width - len(p):] = 1
    images = [it.image for it in items]
    if any(images) and not all(images):
        raise UserError("a generation batch mixes image and text items")
    device = next(lm.model.parameters()).device
    kw = {k: v.to(device) for k, v in inputs(ids, images if all(images) else None).items()}
    ids, attn = ids.to(device), attn.to(device)
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
            records.append({"task": task.name, "id": item.id, "gold": item.answer,
                            "prediction": "" if pred is None else pred, "correct": ok, "generation": text})
        progress(len(batch))
    return 100.0 * correct / max(len(items), 1), records
