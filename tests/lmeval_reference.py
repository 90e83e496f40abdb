"""lm-evaluation-harness itself, run on mlan's items: the reference the lm-eval protocol is tested against.

Each task is a local JSON file of docs in the Hub's field names (mlan.eval.protocols.lm_eval_doc) and a task
YAML that `include`s lm-eval's own installed task YAML (its doc_to_text, doc_to_choice, doc_to_target and
metrics, WinoGrande's partial-scoring functions) and only points the dataset at that file. Used by the tests
and by tools/bench_eval.py.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# mlan's prompt style → lm-eval's own task YAML (relative to lm_eval/tasks); the generic cloze prompt is ARC's
LM_EVAL_YAML = {
    "arc": "arc/arc_easy.yaml",
    "cloze": "arc/arc_easy.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml",
    "piqa": "piqa/piqa.yaml",
    "boolq": "super_glue/boolq/default.yaml",
    "winogrande": "winogrande/default.yaml",
}


def write_task(folder: Path, name: str, style: str, docs: list[dict]) -> str:
    """docs.jsonl + a YAML including lm-eval's own task for `style`; returns the lm-eval task name."""
    import lm_eval

    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    task = f"mlanref_{name}".replace("-", "_")
    base = Path(lm_eval.__file__).parent / "tasks" / LM_EVAL_YAML[style]
    (folder / f"{task}.yaml").write_text(
        f"include: {base}\n"
        f"task: {task}\n"
        "tag: []\n"
        "dataset_path: json\n"
        "dataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "training_split: null\nvalidation_split: null\nfewshot_split: null\ntest_split: test\n"
    )
    return task


def run(model_dir: str, tasks: dict[str, tuple[str, list[dict]]], folder: Path, batch_size: int = 8,
        apply_chat_template: bool = False) -> dict[str, list[dict]]:
    """lm_eval.simple_evaluate (HF backend, fp32, zero-shot) over every task in one process.

    Returns per task the samples in doc order: {"lls": [per option], "acc": 0/1, "acc_norm": 0/1 or None}.
    """
    import lm_eval
    from lm_eval.tasks import TaskManager

    names = {write_task(folder, name, style, docs): name for name, (style, docs) in tasks.items()}
    out = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={model_dir},dtype=float32", tasks=sorted(names),
        num_fewshot=0, batch_size=batch_size, device="cpu", log_samples=True,
        task_manager=TaskManager(include_path=str(folder)), apply_chat_template=apply_chat_template,
        random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0,
    )
    result: dict[str, list[dict]] = {}
    for task, name in names.items():
        samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
        result[name] = [{"lls": [float(r[0][0]) for r in s["resps"]], "acc": s["acc"],
                         "acc_norm": s.get("acc_norm")} for s in samples]
    return result
