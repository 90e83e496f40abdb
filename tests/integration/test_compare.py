"""`mlan compare A B`: results files in the score contract, written here by hand (no model runs)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlan.cli import main
from mlan.eval.stats import compare_records, mcnemar_exact_p, wilson_ci


def write_run(path: Path, model: str, tasks: dict[str, tuple[str, list[tuple[str, bool]]]]) -> Path:
    """FILE.json + FILE.items.jsonl; tasks: name → (group, [(id, correct), ...])."""
    entries, lines = {}, []
    for name, (group, items) in tasks.items():
        right = sum(c for _, c in items)
        entries[name] = {"n": len(items), "accuracy": 100 * right / len(items),
                         "ci95": list(wilson_ci(right, len(items))), "chance": 25.0, "group": group,
                         "kind": "choice", "protocol": "lm-eval", "items_file": path.stem + ".items.jsonl"}
        lines += [json.dumps({"task": name, "id": i, "gold": "A", "prediction": "A" if c else "B", "correct": c})
                  for i, c in items]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"model": model, "protocol": "lm-eval", "tasks": entries}))
    path.with_name(path.stem + ".items.jsonl").write_text("\n".join(lines) + "\n")
    return path


def _items(pattern: str) -> list[tuple[str, bool]]:
    return [(f"q{i}", ch == "1") for i, ch in enumerate(pattern)]


# arc: A right on 30 of 40, B on 36; A only 1 item, B only 7 → p = exact binomial(1 of 8)
ARC_A = "1" * 29 + "1" + "0" * 7 + "000"
ARC_B = "1" * 29 + "0" + "1" * 7 + "000"
PIQA_A = "1100110011"
PIQA_B = "1010110011"


@pytest.fixture
def runs(tmp_path: Path) -> tuple[Path, Path]:
    a = write_run(tmp_path / "a" / "eval.json", "base", {"arc": ("language", _items(ARC_A)),
                                                          "piqa": ("language", _items(PIQA_A)),
                                                          "colour": ("vision", _items("1010"))})
    b = write_run(tmp_path / "b" / "scores.json", "arm", {"arc": ("language", _items(ARC_B)[::-1]),  # order free
                                                           "piqa": ("language", _items(PIQA_B)),
                                                           "colour": ("vision", _items("1111"))})
    return a, b


def test_compare_json_counts_and_pooled_line(runs, capsys) -> None:
    a, b = runs
    assert main(["compare", str(a.parent), str(b), "--json"]) == 0  # a folder holding one results file works
    out = json.loads(capsys.readouterr().out)
    arc = out["tasks"]["arc"]
    assert arc["n"] == 40 and arc["a"]["accuracy"] == 75.0 and arc["b"]["accuracy"] == 90.0
    assert (arc["a_only"], arc["b_only"]) == (1, 7)
    assert arc["difference"] == pytest.approx(15.0)
    assert arc["mcnemar_p"] == pytest.approx(2 * 9 / 256)  # P(X ≤ 1 | Binom(8, ½)) doubled
    lo, hi = arc["difference_ci95"]
    assert 0 <= lo < 15 < hi <= 30
    assert arc["a"]["ci95"] == pytest.approx(list(wilson_ci(30, 40)))
    pooled = out["groups"]["language"]
    assert pooled["n"] == 50 and pooled["tasks"] == ["arc", "piqa"]
    assert (pooled["a_only"], pooled["b_only"]) == (2, 8)
    assert pooled["mcnemar_p"] == pytest.approx(mcnemar_exact_p(2, 8))
    assert out["groups"]["vision"]["n"] == 4


def test_compare_table_names_every_number(runs, capsys) -> None:
    a, b = runs
    assert main(["compare", str(a), str(b)]) == 0
    text = capsys.readouterr().out
    arc = next(line for line in text.splitlines() if line.startswith("arc"))
    lo, hi = wilson_ci(30, 40)
    assert f"75.0 [{lo:.1f}, {hi:.1f}]" in arc and " 40 " in arc and "90.0 [" in arc and "+15.0" in arc
    assert "0.0703" in arc
    assert any(line.startswith("pooled language") for line in text.splitlines())
    assert "10,000 resamples" in text


def test_different_item_sets_are_refused_in_one_line(tmp_path, capsys) -> None:
    a = write_run(tmp_path / "a.json", "base", {"arc": ("language", _items("1100"))})
    b = write_run(tmp_path / "b.json", "arm", {"arc": ("language", _items("110011"))})
    assert main(["compare", str(a), str(b)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "arc" in err and "0 id(s) only in A, 2 only in B" in err


def test_missing_items_file_and_empty_folder_are_user_errors(tmp_path, capsys) -> None:
    a = write_run(tmp_path / "a.json", "base", {"arc": ("language", _items("1100"))})
    lone = tmp_path / "lone.json"
    lone.write_text(json.dumps({"model": "x", "tasks": {"arc": {"n": 4, "accuracy": 50.0, "group": "language"}}}))
    assert main(["compare", str(a), str(lone)]) == 2
    assert "lone.items.jsonl" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["compare", str(a), str(tmp_path / "empty")]) == 2
    assert "no results file" in capsys.readouterr().err


def test_in_process_records_without_ids_pair_by_position() -> None:
    """Today's harness records carry no id: the contract's fallback is the 0-based index."""
    a = {"t": {"group": "language", "records": [{"correct": c} for c in (True, False, True, True)]}}
    b = {"t": {"group": "language", "records": [{"correct": c} for c in (True, True, True, False)]}}
    out = compare_records(a, b)
    assert (out["tasks"]["t"]["a_only"], out["tasks"]["t"]["b_only"]) == (1, 1)
    assert out["tasks"]["t"]["difference"] == 0.0
