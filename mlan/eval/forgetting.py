"""Forgetting as in Srivastava et al.: ω = harmonic mean of a group's accuracies (%), Δ = ω(reference) − ω(model).

Δ > 0 is forgetting. Only the tasks present in both results files count, so the two ω compare like with like.
"""
from __future__ import annotations

from mlan.errors import UserError


def harmonic_mean(values: list[float]) -> float:
    """Harmonic mean of non-negative accuracies; 0 when any is 0 (the limit), error on an empty list."""
    if not values:
        raise ValueError("harmonic mean of no values")
    if any(v < 0 for v in values):
        raise ValueError(f"accuracies must be non-negative, got {values}")
    if any(v == 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


def omega(results: dict, group: str, names: list[str] | None = None) -> float | None:
    """ω of one group of a results dict (optionally restricted to `names`); None when the group is empty."""
    tasks = results.get("tasks", {})
    accs = [t["accuracy"] for n, t in tasks.items() if t.get("group") == group and (names is None or n in names)]
    return harmonic_mean(accs) if accs else None


def forgetting(reference: dict, results: dict, reference_name: str = "reference") -> dict:
    """Per group: ω(reference), ω(model) and Δ over the tasks both results share."""
    if not isinstance(reference, dict) or not isinstance(reference.get("tasks"), dict):
        raise UserError(f"{reference_name}: not an `mlan eval` results file (no 'tasks' mapping)")
    shared = sorted(set(reference["tasks"]) & set(results.get("tasks", {})))
    if not shared:
        raise UserError(f"{reference_name}: shares no task name with this evaluation "
                        f"(reference: {sorted(reference['tasks'])}; here: {sorted(results.get('tasks', {}))})")
    groups = {}
    for group in ("language", "vision"):
        names = [n for n in shared if results["tasks"][n].get("group") == group]
        if not names:
            continue
        ref_w, w = omega(reference, group, names), omega(results, group, names)
        if ref_w is None or w is None:
            continue
        groups[group] = {"reference_omega": ref_w, "omega": w, "delta": ref_w - w, "tasks": names}
    return {"reference": reference_name, "groups": groups}
