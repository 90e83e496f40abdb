"""`lm-eval:NAME` tasks: any lm-evaluation-harness task (a registered name or a task YAML) run by
lm-evaluation-harness 0.4.13 itself on an mlan model, its results returned in mlan's score contract.

mlan's own protocols reproduce lm-eval's prompts for six tasks; everything else (HellaSwag, MMLU, …) is
reached through the harness, so its prompts, few-shot handling and metrics are the harness's, not a copy.
The model is loaded by mlan (its safety checks on the folder) and handed to lm-eval's HF backend as a
module; for a folder of a registered family (LLaVA, Mllama, …) the language model alone (decoder + LM head, where
its family says) is handed over.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mlan.errors import UserError
from mlan.eval.loading import load_model
from mlan.eval.stats import chance_level, majority_rate, wilson_ci

LM_EVAL_VERSION = "0.4.13"


def _lm_eval():
    """lm-evaluation-harness, or a one-line error saying how to install it (an optional extra)."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError("lm-eval tasks need lm-evaluation-harness: pip install 'mlan[lm-eval]' "
                        f"(lm-eval=={LM_EVAL_VERSION})") from None
    return lm_eval, HFLM, TaskManager


def language_model(model: torch.nn.Module, path: str) -> torch.nn.Module:
    """A causal LM as is; a model of a registered family: its text decoder (the family says where) and LM head
    as a text-only causal LM sharing the same parameters (no copy); anything else is refused in one line."""
    from transformers import AutoModelForCausalLM, PreTrainedModel

    from mlan.families.registry import family_for_config

    config = getattr(model, "config", None)
    text_config = getattr(config, "text_config", None)
    plugin = family_for_config(config) if config is not None else None
    if plugin is None and text_config is None:
        return model
    head = model.get_output_embeddings() if plugin is not None else None
    if plugin is None or text_config is None or head is None:
        raise UserError(f"{path}: a {config.model_type} model whose language model mlan cannot separate for lm-eval")
    inner = plugin.runtime().language_model(model)
    import transformers

    # Mllama's text config is not in AutoModelForCausalLM's map; its causal LM is named after its decoder
    named = getattr(transformers, type(inner).__name__.replace("TextModel", "ForCausalLM"), None)
    try:
        with torch.device("meta"):  # every submodule is replaced below: allocate nothing
            lm: PreTrainedModel = (named(text_config) if named is not None and named.__name__.endswith("ForCausalLM")
                                   else AutoModelForCausalLM.from_config(text_config))
    except ValueError as err:
        raise UserError(f"{path}: no text-only causal LM class for {text_config.model_type} "
                        f"({str(err).splitlines()[0]})") from None
    lm.model = inner
    lm.lm_head = head
    left = [n for n, p in lm.named_parameters() if p.is_meta]
    if left:
        raise UserError(f"{path}: the {config.model_type} language model for lm-eval lacks {left[0]}")
    return lm.eval()


def _options(sample: dict, delimiter: str) -> list[str]:
    """Each request's continuation without the target delimiter; for multiple-input tasks (one continuation
    after several contexts, e.g. WinoGrande) the options are the contexts' indices."""
    conts = [arg[1] for arg in sample["arguments"]]
    if len(conts) > 1 and len(set(conts)) == 1:
        return [str(i) for i in range(len(conts))]
    return [c.removeprefix(delimiter) for c in conts]


def _records(task: str, samples: list[dict], delimiter: str, output_type: str, metric: str) -> list[dict]:
    """The contract's per-item dicts from lm-eval's logged samples (its own acc / acc_norm per item)."""
    records = []
    for s in sorted(samples, key=lambda s: s["doc_id"]):
        doc = s.get("doc") if isinstance(s.get("doc"), dict) else {}
        item_id = str(doc.get("id", s["doc_id"]))
        if output_type == "multiple_choice":
            opts = _options(s, delimiter)
            lls = [float(r[0]) for r in s["filtered_resps"]]
            target = s["target"]
            gold = opts[target] if isinstance(target, int) and 0 <= target < len(opts) else str(target)
            rec = {"task": task, "id": item_id, "gold": gold, "prediction": opts[int(np.argmax(lls))],
                   "correct": bool(s[metric]), "loglik": lls}
            if "acc_norm" in s:
                norm = np.asarray(lls) / np.asarray([float(len(o)) or 1.0 for o in opts])
                rec.update(prediction_norm=opts[int(np.argmax(norm))], correct_norm=bool(s["acc_norm"]))
        else:
            value = s[metric]
            if value not in (0, 1, True, False):
                raise UserError(f"lm-eval:{task}: metric {metric} is not a per-item 0/1 score ({value!r}); "
                                "mlan's contract needs a correct/incorrect per item")
            resp = s["filtered_resps"]
            rec = {"task": task, "id": item_id, "gold": str(s["target"]),
                   "prediction": str(resp[0] if isinstance(resp, list) and resp else resp), "correct": bool(value)}
        records.append(rec)
    return records


def _percent(values: list[bool]) -> dict[str, Any]:
    n, right = len(values), sum(values)
    return {"value": 100 * right / n, "ci95": list(wilson_ci(right, n))}


def run_lm_eval_task(model_path: str, spec: str, limit: int | None, batch_size: int) -> tuple[dict, list[dict]]:
    """Run one lm-evaluation-harness task (registered name or task YAML path) on an mlan model folder.

    Returns (task entry, per-item records) in the score contract: protocol "lm-eval", n, accuracy (acc),
    ci95 (Wilson), acc and acc_norm with their intervals, chance from each item's number of choices,
    majority from the gold answers; `limit` takes the first N items as lm-eval's --limit does.
    """
    lm_eval, HFLM, TaskManager = _lm_eval()
    if limit is not None and limit <= 0:
        raise UserError(f"lm-eval:{spec}: --limit {limit} scores no item (n = 0)")
    yaml_path = Path(spec)
    is_yaml = spec.endswith((".yaml", ".yml"))
    if is_yaml and not yaml_path.is_file():
        raise UserError(f"lm-eval:{spec}: task YAML not found")
    loaded = load_model(model_path)
    model = language_model(loaded.model, model_path)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(logging.ERROR)  # the harness's per-task INFO/WARNING chatter
    hflm = HFLM(pretrained=model, tokenizer=loaded.tokenizer, batch_size=batch_size, device=device)
    manager = TaskManager(include_defaults=not is_yaml or _yaml_includes(yaml_path))
    try:
        out = lm_eval.simple_evaluate(model=hflm, tasks=[str(yaml_path.resolve()) if is_yaml else spec],
                                      task_manager=manager, limit=limit, log_samples=True,
                                      bootstrap_iters=0, verbosity=None)
    except (KeyError, ValueError, FileNotFoundError) as err:
        raise UserError(f"lm-eval:{spec}: lm-evaluation-harness could not run it "
                        f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
    samples = out.get("samples", {})
    if len(samples) != 1:
        raise UserError(f"lm-eval:{spec}: names a group of {len(samples)} tasks ({', '.join(sorted(samples))}); "
                        "name one task")
    task, task_samples = next(iter(samples.items()))
    config = out["configs"][task]
    output_type = config.get("output_type", "")
    metrics = [m["metric"] for m in config.get("metric_list", []) if isinstance(m.get("metric"), str)]
    metric = "acc" if output_type == "multiple_choice" else (metrics[0] if metrics else "exact_match")
    records = _records(task, task_samples, config.get("target_delimiter", " "), output_type, metric)
    if not records:
        raise UserError(f"lm-eval:{spec}: the task has no items (n = 0)")
    correct = [r["correct"] for r in records]
    acc = _percent(correct)
    entry: dict[str, Any] = {
        "n": len(records), "accuracy": acc["value"], "ci95": acc["ci95"],
        "chance": chance_level([len(r["loglik"]) for r in records]) if output_type == "multiple_choice" else 0.0,
        "majority": majority_rate([r["gold"] for r in records]), "protocol": "lm-eval",
        "metric": metric, "group": "language",
        "kind": "choice" if output_type == "multiple_choice" else "generate",
        "format": f"lm-eval {output_type}", "path": str(yaml_path.resolve()) if is_yaml else f"lm-eval:{spec}",
        "lm_eval": {"task": task, "version": out.get("lm_eval_version") or LM_EVAL_VERSION,
                    "results": {k: v for k, v in out["results"][task].items() if isinstance(v, (int, float))}},
    }
    if output_type == "multiple_choice":
        entry["acc"] = acc
        if all("correct_norm" in r for r in records):
            entry["acc_norm"] = _percent([r["correct_norm"] for r in records])
    return entry, records


def _yaml_includes(path: Path) -> bool:
    """A task YAML that `include:`s a template or names a registered group needs lm-eval's own task index
    (slower to build); a self-contained one does not."""
    text = path.read_text(errors="replace")
    return "include:" in text or "!function" in text
