"""`mlan continual`: the matrix and the paper's scores recomputed independently from the per-task eval files,
exact rehearsal counts from a real build's stats.json, the mSGM preset (only adapters + projector train, with the
soft-target loss), and (slow) a SIGKILL mid-sequence that resumes to a whole matrix without redoing finished tasks."""
from __future__ import annotations

import csv
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from mlan.cli import main
from mlan.continual.data import generate_continual_tiny
from mlan.continual.rehearsal import replay_sources, sample_indices, with_replay
from mlan.continual.scores import write_outputs
from mlan.continual.spec import ContinualError, check_tasks, load_continual, task_raw
from mlan.recipe import parse_recipe
from mlan.sources.readers import read_records
from mlan.train.model import prepare_model

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "continual-tiny.yaml"
# the whole-sequence test's sizes: what it checks (the matrix, resume, rehearsal counts, msgm's exports) does not
# need the tasks learned, only run; each token trained or item scored is time in every one of its runs
VL_EXAMPLES = 30  # each VL task's own examples in its build
SMALL = ["tasks.language.budget.tokens=2500",
         *(f"tasks.{task}.budget.examples={VL_EXAMPLES}" for task in ("colours", "positions", "warmth")),
         "base.eval.limit=8"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ct")
    generate_continual_tiny(out / "data")
    return out


# ---------------------------------------------------------------- independent recomputation
def _hm(values: list[float], floor: float | None = None) -> float:
    """Independent ω: statistics.harmonic_mean (0 if any value is 0) over accuracies, optionally floored."""
    values = [max(v, floor) if floor else v for v in values]
    return 0.0 if min(values) == 0 else statistics.harmonic_mean(values)


def recompute(out: Path, task_sets: list[list[str]], floor: float | None = None) -> tuple[dict, dict]:
    """ω_t(k) from the task folders' eval.json files, then NL Δ, VL Avg and Δ_t(k), in a few lines."""
    evals = {int(d.name.split("-")[1]): json.loads((d / "eval.json").read_text())["tasks"]
             for d in sorted(out.glob("task-*")) if (d / "eval.json").is_file()}
    w = {k: {t: _hm([ev[n]["accuracy"] for n in names], floor) for t, names in enumerate(task_sets[:k], 1)}
         for k, ev in evals.items()}
    nl = {k: w[1][1] - w[k][1] for k in w}
    vl = {k: _hm([evals[k][n]["accuracy"] for names in task_sets[1:k] for n in names], floor) for k in w if k > 1}
    delta = {t: {k: w[t][t] - w[k][t] for k in w if k > t} for t in range(2, max(w))}
    return w, {"nl": nl, "vl": vl, "delta": delta, "evals": evals}


def _read_matrix(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def check_outputs(out: Path, task_sets: list[list[str]], floor: float | None = None) -> None:
    w, ref = recompute(out, task_sets, floor)
    rows = _read_matrix(out / "matrix.csv")
    want = [(k, t, n, ref["evals"][k][n]["accuracy"], w[k][t]) for k in sorted(w)
            for t, names in enumerate(task_sets[:k], 1) for n in names]
    assert [(int(r["after_task"]), int(r["task"]), r["eval_set"]) for r in rows] == [x[:3] for x in want]
    for r, x in zip(rows, want):
        assert float(r["accuracy"]) == pytest.approx(x[3], abs=1e-4) and float(r["omega"]) == pytest.approx(x[4], abs=1e-4)
    fg = json.loads((out / "forgetting.json").read_text())
    assert {int(k): v for k, v in fg["nl_delta"].items()} == pytest.approx(ref["nl"])
    assert {int(k): v for k, v in fg["vl_avg"].items()} == pytest.approx(ref["vl"])
    got = {(int(t), int(k)): v for t, by in fg["delta"].items() for k, v in by.items()}
    assert got == pytest.approx({(t, k): v for t, by in ref["delta"].items() for k, v in by.items()})
    last = max(w)
    vl_tasks = range(2, last)
    if vl_tasks:
        bwt = statistics.mean(w[last][t] - w[t][t] for t in vl_tasks)
        assert fg["backward_transfer"][str(last)] == pytest.approx(bwt)
        forget = statistics.mean(max(w[m][t] for m in range(t, last)) - w[last][t] for t in vl_tasks)
        assert fg["mean_forgetting"][str(last)] == pytest.approx(forget)
    assert (out / "report.md").is_file() and (out / "heatmap.png").stat().st_size > 1000


@pytest.mark.parametrize("floor", [None, 0.1])
def test_matrix_and_scores_recomputed_from_eval_files(tmp_path, floor) -> None:
    task_sets = [["lang_a", "lang_b"], ["v1"], ["v2a", "v2b"], ["v3"]]
    accs = {1: {"lang_a": 60, "lang_b": 40}, 2: {"lang_a": 50, "lang_b": 30, "v1": 80},
            3: {"lang_a": 45, "lang_b": 35, "v1": 0.0, "v2a": 70, "v2b": 90},
            4: {"lang_a": 55, "lang_b": 20, "v1": 40, "v2a": 65, "v2b": 10, "v3": 100}}
    evals = {}
    for k, by in accs.items():
        d = tmp_path / f"task-{k}-t{k}"
        d.mkdir()
        results = {"tasks": {n: {"accuracy": float(a), "group": "language" if n.startswith("lang") else "vision"}
                             for n, a in by.items()}}
        (d / "eval.json").write_text(json.dumps(results))
        evals[k] = results
    write_outputs(tmp_path, "t", "naive", "none", ["l", "a", "b", "c"], task_sets, evals, floor, {})
    check_outputs(tmp_path, task_sets, floor)
    fg = json.loads((tmp_path / "forgetting.json").read_text())
    # the paper's NL Δ by hand: ω1(1) = H(60, 40) = 48, ω1(4) = H(55, 20)
    assert fg["nl_delta"]["4"] == pytest.approx(48.0 - 2 / (1 / 55 + 1 / 20))
    assert fg["vl_avg"]["3"] == (pytest.approx(0.0) if floor is None else pytest.approx(_hm([0.1, 70, 90])))


def test_intervals_from_per_item_records(tmp_path) -> None:
    """With per-item records: n and the Wilson interval per eval set, ω with ±, and NL Δ paired with after task 1."""
    from mlan.eval.stats import compare_paired, wilson_ci

    task_sets = [["lang"], ["v1"]]
    lang1 = [True] * 30 + [False] * 20
    lang2 = [True] * 22 + [False] * 28  # 8 items forgotten
    v1 = [True] * 35 + [False] * 5

    def entry(group: str, correct: list[bool]) -> dict:
        return {"accuracy": 100 * sum(correct) / len(correct), "n": len(correct), "group": group, "kind": "choice",
                "records": [{"correct": c, "loglikelihoods": [0.0, 0.0]} for c in correct]}
    evals = {1: {"tasks": {"lang": entry("language", lang1)}},
             2: {"tasks": {"lang": entry("language", lang2), "v1": entry("vision", v1)}}}
    scores = write_outputs(tmp_path, "t", "naive", "none", ["l", "v"], task_sets, evals, None, {})
    rows = _read_matrix(tmp_path / "matrix.csv")
    assert rows[0]["n"] == "50" and float(rows[0]["ci95_lo"]) == pytest.approx(wilson_ci(30, 50)[0])
    assert rows[0]["chance"] == "50.0"
    assert scores["nl_delta"][2] == pytest.approx(16.0)
    lo, hi = scores["nl_delta_ci95"][2]
    paired = compare_paired(lang1, lang2)  # B − A = −16 points; NL Δ = A − B
    assert lo < 16.0 < hi and abs(lo + paired.difference_ci95[1]) < 1.0 and abs(hi + paired.difference_ci95[0]) < 1.0
    report = (tmp_path / "report.md").read_text()
    assert "+16.0 [" in report and "| 2 | 2 | v1 | 40 | 87.5 ± " in report


# ---------------------------------------------------------------- recipe and presets
def test_recipe_errors_name_the_key(tmp_path, capsys) -> None:
    bad = tmp_path / "c.yaml"
    bad.write_text(RECIPE.read_text().replace("method: naive", "method: ewc"))
    assert main(["continual", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "method" in err and err.startswith("mlan continual: error:")
    spec = load_continual(RECIPE, ["tasks.colours.sources.0.modality=text"], tmp_path)
    with pytest.raises(ContinualError, match=r"task 2 \(colours\): sources \['colours'\] are not modality 'image_text'"):
        check_tasks(spec)


def test_msgm_trains_only_adapters_and_projector_with_soft_targets(data_root) -> None:
    spec = load_continual(RECIPE, ["method=msgm"], data_root)
    recipe = parse_recipe(task_raw(spec, 1, "tiny"), spec.base_dir)
    assert recipe.train.soft_targets == 0.01  # the Stepper's target_loss_sum gets α = 0.01
    lora = recipe.train.lora
    assert (lora.enabled, lora.rank, lora.alpha, lora.dropout, lora.rslora) == (True, None, 8.0, 0.05, True)
    model = prepare_model(recipe, {"family": "llava"})
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "multi_modal_projector" in n for n in trainable)
    assert any("multi_modal_projector" in n for n in trainable)
    hidden = model.get_base_model().config.text_config.hidden_size
    ranks = {p.shape[0] for n, p in model.named_parameters() if "lora_A" in n}
    assert ranks == {hidden // 2}
    # the language task is trained as written (naive), whatever the method
    assert not parse_recipe(task_raw(spec, 0, None), spec.base_dir).train.lora.enabled
    naive = parse_recipe(task_raw(load_continual(RECIPE, [], data_root), 1, "tiny"), spec.base_dir)
    assert (naive.train.lora.enabled, naive.train.soft_targets) == (False, None)


# ---------------------------------------------------------------- rehearsal
def test_rehearsal_sample_is_seeded_and_exact(data_root) -> None:
    spec = load_continual(RECIPE, ["rehearsal.fraction=0.05"], data_root)
    recipes = check_tasks(spec)
    earlier = [(spec.tasks[j].name, recipes[j], 1) for j in (1, 2)]
    a = replay_sources(spec.rehearsal, earlier, data_root / "replay-a")
    b = replay_sources(spec.rehearsal, earlier, data_root / "replay-b")
    assert [(r.task, r.count, r.of) for r in a] == [("colours", 20, 400), ("positions", 20, 400)]
    assert [Path(r.entry["path"]).read_text() for r in a] == [Path(r.entry["path"]).read_text() for r in b]
    for r, (_, recipe, _) in zip(a, earlier):
        records = [rec for _, rec in read_records(recipe.sources[0])]
        idx = sample_indices(400, 0.05, spec.rehearsal.seed, f"{r.task}/{r.source}")
        replayed = [json.loads(line) for line in Path(r.entry["path"]).read_text().splitlines()]
        assert replayed == [records[i] for i in idx] and len(set(idx.tolist())) == 20
    sources, budget = with_replay([{"name": "w", "weight": 1.0}], {"examples": 200}, a, "warmth")
    assert budget == {"examples": 240} and [s["weight"] for s in sources] == [200.0, 20.0, 20.0]
    with pytest.raises(ContinualError, match="budget in examples"):
        with_replay([{"name": "w"}], {"tokens": 5000}, a, "warmth")


@pytest.mark.slow
def test_rehearsal_counts_exact_in_build_stats(data_root, tmp_path) -> None:
    from mlan.continual.run import replayed_counts

    spec = load_continual(RECIPE, ["rehearsal.fraction=0.05", "tasks.warmth.budget.examples=50"], data_root)
    recipes = check_tasks(spec)
    replays = replay_sources(spec.rehearsal, [(spec.tasks[j].name, recipes[j], 1) for j in (1, 2)], tmp_path / "r")
    own, budget = with_replay(list(spec.tasks[3].sources), spec.tasks[3].budget, replays, "warmth")
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(task_raw(spec, 3, None, own, budget)))
    assert main(["build", str(recipe_file), "--out", str(tmp_path / "build"), "--workers", "1",
                 "--cache", str(tmp_path / "cache")]) == 0
    stats = json.loads((tmp_path / "build" / "stats.json").read_text())
    assert stats["examples"]["by_source"] == {"warmth": 50, "rehearsal-colours": 20, "rehearsal-positions": 20}
    assert replayed_counts(tmp_path / "build") == {"rehearsal-colours": 20, "rehearsal-positions": 20}
    assert "rehearsal-colours" in (tmp_path / "build" / "report.md").read_text()


# ---------------------------------------------------------------- the whole sequence (slow)
def _continual_args(out: Path, extra: list[str], recipe: Path = RECIPE) -> list[str]:
    """`mlan continual` arguments: the recipe at SMALL's sizes (its tasks only), then `extra` settings."""
    args = ["continual", str(recipe), "--out", str(out)]
    tasks = {t["name"] for t in yaml.safe_load(recipe.read_text())["tasks"]}
    small = [s for s in SMALL if not s.startswith("tasks.") or s.split(".")[1] in tasks]  # its tasks only
    for s in [*small, *extra]:
        args += ["--set", s]
    return args


def _run(out: Path, extra: list[str], recipe: Path = RECIPE) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mlan.cli", *_continual_args(out, extra, recipe)],
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": str(RECIPE.parents[1])})


def _first_tasks(n: int, path: Path) -> Path:
    """recipes/continual-tiny.yaml with its first `n` tasks only (its paths are {out}-relative)."""
    raw = yaml.safe_load(RECIPE.read_text())
    raw["tasks"] = raw["tasks"][:n]
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.mark.slow
def test_sigkill_mid_sequence_resumes_to_a_whole_matrix(tmp_path, capsys) -> None:
    """A sequence SIGKILLed in its last task's training, then rerun: the finished tasks are not redone, the last
    one completes, and the matrix, scores, rehearsal counts and msgm exports check out. That the rerun's numbers
    equal an uninterrupted run's follows from its steps': a killed `mlan train --resume` equals the uninterrupted
    run (test_train), a killed build resumes byte-identically (test_build), eval is deterministic."""
    # Three tasks (language, then two VL tasks) are the fewest that exercise everything checked here: a VL
    # task between the first and the last (backward transfer, mean forgetting, Δ), an msgm export following
    # another VL export, and a rehearsal build replaying an earlier VL task; two replayed sources in one build
    # are test_rehearsal_counts_exact_in_build_stats's.
    recipe = _first_tasks(3, tmp_path / "continual-3.yaml")
    extra = ["method=msgm", "rehearsal.fraction=0.05"]
    task_sets = [["word_groups"], ["colours"], ["positions"]]
    out = tmp_path / "run"
    proc = _run(out, extra, recipe)
    deadline = time.time() + 1200
    build3 = out / "task-3-positions" / "build" / "manifest.json"
    while not build3.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(3)  # into task 3's training
    assert proc.poll() is None, "the run ended before the kill"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "task-3-positions" / "eval.json").is_file()
    finished = [f for k in (1, 2) for f in (*next(out.glob(f"task-{k}-*")).glob("eval.json"),
                                             *next(out.glob(f"task-{k}-*")).glob("run/final/*.safetensors"))]
    stamps = {f: f.stat().st_mtime_ns for f in finished}
    assert len(stamps) >= 4
    assert _run(out, extra, recipe).wait(timeout=1500) == 0
    assert {f: f.stat().st_mtime_ns for f in stamps} == stamps  # tasks 1-2 were not redone
    check_outputs(out, task_sets)
    # rehearsal: exact counts in the build's stats; the language task is never replayed
    build = out / "task-3-positions" / "build"
    by_source = json.loads((build / "stats.json").read_text())["examples"]["by_source"]
    assert by_source == {"positions": VL_EXAMPLES, "rehearsal-colours": 20}
    # msgm: the vision tower and embeddings of each VL export equal the previous export's; LM linears move by rank ≤ r
    from safetensors.torch import load_file

    prev = load_file(str(out / "task-2-colours" / "run" / "final" / "model.safetensors"))
    cur = load_file(str(out / "task-3-positions" / "run" / "final" / "model.safetensors"))
    assert prev.keys() == cur.keys()
    for name, w in cur.items():
        if "vision_tower" in name or "embed_tokens" in name or "norm" in name or "lm_head" in name:
            assert torch.equal(w, prev[name]), name
        elif "language_model" in name and name.endswith("proj.weight"):
            diff = (w - prev[name]).double()  # merged in fp32: rounding noise far below the adapters' update
            assert int(torch.linalg.matrix_rank(diff, rtol=1e-4)) <= 32, name
    assert any(not torch.equal(w, prev[n]) for n, w in cur.items() if "multi_modal_projector" in n)
    # a different recipe on the same folder is refused, in one line (in-process: the CLI's own main, no start-up)
    capsys.readouterr()
    assert main(_continual_args(out, ["method=naive"], recipe)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "with a different continual recipe (differs in method" in err, err
