"""A run's results on disk: FILE.json (the score contract, without records) and FILE.items.jsonl (one line per
item), written and read back with each task's records, so that ablate, continual, study and the merge sweep
compare their runs paired (mlan.eval.stats.compare_records) from the same files `mlan compare` reads."""
from __future__ import annotations

import json
from pathlib import Path

from mlan.errors import UserError


def items_path(results_file: Path, results: dict | None = None) -> Path:
    """The per-item file of a results file: a task's `items_file` (beside the results file) when named,
    else FILE.items.jsonl beside FILE.json (the score contract)."""
    for entry in (results or {}).get("tasks", {}).values():
        named = entry.get("items_file") if isinstance(entry, dict) else None
        if named:
            return results_file.parent / Path(named).name
    return results_file.with_name(results_file.stem + ".items.jsonl")


def save_results(results: dict, path: Path) -> None:
    """FILE.json without records and FILE.items.jsonl (the harness's writer); records that lack the contract's
    `task` and `id` get them (the id is the 0-based position)."""
    from mlan.eval.harness import write_results  # lazy: the harness pulls torch; reading results does not

    tasks = {}
    for name, entry in results["tasks"].items():
        records = [{"task": name, "id": str(i), **r} if "id" not in r or "task" not in r else r
                   for i, r in enumerate(entry.get("records", []))]
        tasks[name] = {**entry, "records": records}
    write_results({**results, "tasks": tasks}, path)


def attach_records(results_file: Path, results: dict, required: bool = False) -> bool:
    """Put each task's per-item records under tasks[NAME]["records"] from the items file; False when there is
    none (a run scored before per-item files existed), a UserError when `required`."""
    items = items_path(results_file, results)
    if not items.is_file():
        if required:
            raise UserError(f"{results_file}: no per-item file {items.name} beside it; a paired comparison needs "
                            "it (`mlan eval --out FILE.json` writes it)")
        return False
    for entry in results["tasks"].values():
        entry["records"] = []
    with items.open() as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                task, _ = rec["task"], rec["correct"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise UserError(f"{items}:{line_no}: not a per-item record with \"task\" and \"correct\" "
                                f"({type(err).__name__}: {err})") from None
            if task not in results["tasks"]:
                raise UserError(f"{items}:{line_no}: task {task!r} is not in {results_file.name}")
            results["tasks"][task]["records"].append(rec)
    for name, entry in results["tasks"].items():
        if not entry["records"]:
            raise UserError(f"{items}: no items of task {name}")
    return True


def load_results(path: Path, required: bool = False) -> dict:
    """A results file with its records attached when its items file exists (see `attach_records`)."""
    try:
        results = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not a results JSON file ({err})") from None
    if not isinstance(results, dict) or not isinstance(results.get("tasks"), dict):
        raise UserError(f"{path}: not a results file of `mlan eval` (no \"tasks\")")
    attach_records(Path(path), results, required)
    return results
