"""`mlan study`: the MLAN study on a real pretrained LLM (SmolLM2-135M-Instruct), offline, on a CPU.

Cells, each finished once and read back afterwards (OUT/<cell>/result.json is written last, atomically):
  base            the base LLM's language scores and held-out text loss; the untrained composed VLM's vision
  ratio-R         build → train → eval at text ratio R (same token budget, seed and settings for every R)
  soft-targets    the vision-heaviest mixture (lowest ratio) with train.soft_targets = 0.01
  lora            the vision-heaviest mixture with rsLoRA on the language model
  merge           task-vector merges (α × K) of the vision-heaviest model with the base LLM
The vision tower is a small *randomly initialised* CLIP (no CLIP/SigLIP weights are reachable offline): it is
frozen (stage 2), so vision skill comes from the trained projector and LM alone. Writes OUT/report.md,
OUT/study.csv, OUT/ratio.png and OUT/merge/sweep.png after every cell. Every score carries n and its 95 %
interval; every comparison with the base is paired on the same items (each cell keeps its per-item records in
eval.items.jsonl). Before the first training step the study prints its power statement (OUT/power.md): per
task n and the smallest paired difference it can detect.
"""
from __future__ import annotations

import csv
import json
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from mlan import progress
from mlan.ablate import _sets, ratio_tag, write_plot
from mlan.atomic_write import write_text_atomic
from mlan.data.labels import IGNORE_INDEX
from mlan.errors import UserError
from mlan.eval.forgetting import forgetting, harmonic_mean
from mlan.eval.harness import load_model
from mlan.eval.results_files import load_results, save_results
from mlan.eval.stats import (
    aligned_correct,
    difference_cell,
    group_ci,
    harmonic_of,
    mcnemar_exact_p,
    mean_of,
    min_detectable_difference,
    paired_counts,
    paired_group_difference,
    score_stats,
)
from mlan.eval.stats import (
    cell as score_cell,
)
from mlan.families.modeling import build_model
from mlan.families.registry import get_family
from mlan.merge import SweepSpec, merge_sweep
from mlan.pipeline import (
    Pipeline,
    Step,
    build_complete,
    evaluation,
    export_complete,
    results_complete,
    sweep_complete,
)
from mlan.pretrained import resolve_model_path
from mlan.recipe import Recipe, expand_env, load_recipe
from mlan.synthetic import generate_demo_data
from mlan.train.export import save_processor
from mlan.train.metrics import mean_tokens_per_s, step_seconds

DEFAULT_RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "study-smollm2.yaml"
NLVR_HELD_OUT_FROM = 900  # NLVR dev records [900, 988) are never trained on (the recipe's nlvr limit is 850)
ALPACA_HELD_OUT_FROM = 900  # alpaca records [900, 999): held-out text loss (the recipe's alpaca limit is 800)
VISION_NOTE = ("The vision tower is a small randomly initialised CLIP (frozen): no pretrained vision weights are "
               "reachable offline, so vision scores measure what the projector and LM learn on top of random features.")


@dataclass(frozen=True)
class StudySettings:
    """What differs between the full study and `--quick` (a smoke run of every cell in minutes)."""

    ratios: tuple[float, ...] = (0.0, 0.25, 0.75, 1.0)
    alphas: tuple[float, ...] = (0.3, 0.6)
    densities: tuple[float, ...] = (0.2, 1.0)
    heldout_docs: int = 30
    overrides: tuple[str, ...] = ()

    @classmethod
    def quick(cls) -> StudySettings:
        return cls(ratios=(0.0, 1.0), alphas=(0.5,), densities=(1.0,), heldout_docs=4, overrides=(
            "mixture.budget.tokens=1500", "mixture.seq_len=256", "shards.target_tokens=1000",
            "eval.limit=3", "eval.max_new_tokens=8"))


# ---------------------------------------------------------------- data
def prepare(out: Path, recipe_src: Path) -> Path:
    """Generated colour data and the NLVR held-out eval file under OUT/data; OUT/study.yaml with absolute paths."""
    data = out / "data"
    if not (data / "eval_vision.jsonl").is_file():
        generate_demo_data(data, n_text=1, n_image=240, n_eval_vision=80, image_size=56)
    raw = yaml.safe_load(recipe_src.read_text())
    shared = None
    for src in raw.get("sources", []):
        if src["name"] == "nlvr":
            shared = (recipe_src.parent / expand_env(src["images"])).resolve()
    if shared is None:
        raise UserError(f"{recipe_src}: the study needs an `nlvr` source (its images feed the held-out vision task)")
    nlvr_eval = data / "nlvr_eval.jsonl"
    # the NLVR fields stay in each row: the eval task renders its prompt with the training source (`source: nlvr`);
    # a file written before that lacks them and is written again
    if not nlvr_eval.is_file() or '"sentence"' not in nlvr_eval.read_text().partition("\n")[0]:
        records = [json.loads(line) for line in (shared / "dev.json").read_text().splitlines() if line.strip()]
        rows = []
        for r in records[NLVR_HELD_OUT_FROM:]:
            image = shared / "images" / str(r["directory"]) / f"dev-{r['identifier']}-0.png"
            rows.append({**r, "question": f"Is the following statement true or false for this picture?\n\"{r['sentence']}\"",
                         "choices": ["true", "false"], "answer": str(r["label"]).lower(), "image": str(image)})
        write_text_atomic(nlvr_eval, "".join(json.dumps(r) + "\n" for r in rows))
    # paths written relative to the shipped recipe become absolute; `data/...` stays relative to OUT
    for section in (raw.get("sources", []), raw.get("eval", {}).get("tasks", [])):
        for item in section:
            for key in ("path", "images"):
                if not isinstance(item.get(key), str):
                    continue
                value = expand_env(item[key])
                relative = not value.startswith("data/") and not Path(value).is_absolute()
                item[key] = str((recipe_src.parent / value).resolve()) if relative else value
    study = out / "study.yaml"
    write_text_atomic(study, "# written by `mlan study` from " + str(recipe_src) + "\n" + yaml.safe_dump(raw, sort_keys=False))
    return study


# ---------------------------------------------------------------- measurements
@torch.no_grad()
def heldout_doc_losses(model_dir: str, alpaca: Path, n_docs: int) -> list[tuple[float, int]]:
    """(summed answer-token loss, answer tokens) per held-out alpaca record, rendered with the model's chat
    template; per document so that the loss gets a bootstrap interval over documents."""
    lm = load_model(model_dir)
    tok = lm.tokenizer
    records = json.loads(alpaca.read_text())[ALPACA_HELD_OUT_FROM:ALPACA_HELD_OUT_FROM + n_docs]
    docs: list[tuple[float, int]] = []
    for r in records:
        user = (r["instruction"] + ("\n" + r["input"] if r.get("input") else "")).strip()
        msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": r["output"].strip()}]
        prompt = tok.apply_chat_template(msgs[:1], tokenize=True, add_generation_prompt=True, return_dict=False)
        full = tok.apply_chat_template(msgs, tokenize=True, return_dict=False)[:512]
        ids = torch.tensor([full])
        logits = lm.model(input_ids=ids, use_cache=False).logits[0, :-1].float()
        targets = ids[0, 1:].clone()
        targets[: len(prompt) - 1] = IGNORE_INDEX
        docs.append((float(torch.nn.functional.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")),
                     int((targets != IGNORE_INDEX).sum())))
    return docs


def _loss_of(docs: list) -> float:
    return sum(t for t, _ in docs) / max(sum(c for _, c in docs), 1)


def heldout_loss(model_dir: str, alpaca: Path, n_docs: int) -> float:
    """Mean per-token loss on the answers of held-out alpaca records (every answer token weighs the same)."""
    return _loss_of(heldout_doc_losses(model_dir, alpaca, n_docs))


def loss_interval(docs: list, base_docs: list | None = None, resamples: int = 10_000,
                  seed: int = 0) -> tuple[float, float]:
    """Bootstrap 95 % interval over documents of the per-token loss (a ratio of sums); with `base_docs` (the
    same documents scored by the base) the interval of loss − base loss, documents resampled jointly."""
    import numpy as np

    d = np.asarray(docs, dtype=float)
    idx = np.random.default_rng(seed).integers(0, len(d), size=(resamples, len(d)))
    stat = d[idx, 0].sum(1) / np.maximum(d[idx, 1].sum(1), 1)
    if base_docs is not None:
        b = np.asarray(base_docs, dtype=float)
        stat = stat - b[idx, 0].sum(1) / np.maximum(b[idx, 1].sum(1), 1)
    lo, hi = np.percentile(stat, [2.5, 97.5])
    return float(lo), float(hi)


# ---------------------------------------------------------------- cells
class Study:
    """One study folder: runs the cells not finished yet and rewrites the report after each."""

    def __init__(self, recipe_src: Path, out: Path, settings: StudySettings, nproc: int, quick: bool,
                 log: Callable[[str], None]):
        self.out, self.settings, self.nproc, self.quick, self.log = out, settings, nproc, quick, log
        self.recipe_src = recipe_src
        out.mkdir(parents=True, exist_ok=True)
        self.recipe_path = prepare(out, recipe_src)
        self.recipe: Recipe = load_recipe(self.recipe_path, list(settings.overrides))
        self.base_llm = resolve_model_path(self.recipe.model.llm or "")
        self.cache = out / "cache"
        self.alpaca = Path(self.recipe.source("alpaca").path)
        self.again = "mlan study --out " + shlex.quote(str(out)) + (" --quick" if quick else "")
        self.pipeline = Pipeline(total=0, log=log)  # run_study sets the total it plans

    # -- helpers
    def _done(self, cell: str) -> dict | None:
        f = self.out / cell / "result.json"
        return json.loads(f.read_text()) if f.is_file() else None

    def _finish(self, cell: str, row: dict) -> dict:
        write_text_atomic(self.out / cell / "result.json", json.dumps(row, indent=2) + "\n")
        return row

    def _eval(self, model: str, cell: Path, groups: tuple[str, ...] = ("language", "vision")) -> dict:
        """The eval step of a cell (skipped when cell/eval.json and its items file are complete); its results."""
        f = cell / "eval.json"
        ev = self.recipe.eval
        tasks = [t for t in self._tasks() if (t.group or "language") in groups]
        evaluated = self.pipeline.run_step(Step(
            "eval", cell.relative_to(self.out).as_posix(), f, results_complete,
            note=f"{model} on {', '.join(t.name for t in tasks)}",
            call=evaluation(model, tasks, f, batch_size=ev.batch_size, limit=ev.limit,
                            max_new_tokens=ev.max_new_tokens)))  # eval.items.jsonl: the paired comparisons read it
        return evaluated.value if evaluated.ran else load_results(f)

    def _tasks(self) -> list:
        """The recipe's eval tasks; eval.limit caps every task's own limit (a task's limit wins in `evaluate`)."""
        ev = self.recipe.eval
        if ev.limit is None:
            return list(ev.tasks)
        return [t.model_copy(update={"limit": min(t.limit or ev.limit, ev.limit)}) for t in ev.tasks]

    def _commands(self, sets: list[str], d: Path, build: Path) -> list[str]:
        s = " ".join(f"--set {shlex.quote(x)}" for x in [*self.settings.overrides, *sets])
        r = shlex.quote(str(self.recipe_path))
        return [f"mlan build {r} --out {build} --cache {self.cache} {s}".strip(),
                f"mlan train {r} --shards {build} --out {d / 'run'} --nproc {self.nproc} --resume {s}".strip(),
                f"rm -f {d / 'eval.json'} {d / 'result.json'} && {self.again}  # re-scores with the recipe's eval.tasks"]

    def task_sizes(self) -> list[tuple[str, str, int]]:
        """(name, group, items scored) per eval task, from the task files and the recipe's limits."""
        from mlan.eval.harness import _as_task  # the harness's own reading of a recipe task (limits, formats)

        return [(t.name, t.group or "language", len(_as_task(t, None, None).items)) for t in self._tasks()]

    def power(self) -> str:
        """The power statement (OUT/power.md): per task n and the smallest detectable paired difference."""
        text = power_statement(self.task_sizes(), measured_discordance(self.out))
        write_text_atomic(self.out / "power.md", text + "\n")
        return text

    def report(self, started: float) -> None:
        """Rewrite the report from what is finished now, its power statement included (measured once a first arm
        has finished): a study killed and rerun ends with the report an uninterrupted one does."""
        self.power()
        write_report(self, started)

    # -- cells
    def base(self) -> dict:
        done = self._done("base")
        if done:
            return done
        t0 = time.perf_counter()
        d = self.out / "base"
        d.mkdir(parents=True, exist_ok=True)
        self.log(f"base: evaluating {self.recipe.model.llm} (language) and the untrained composed VLM (vision)")
        lang = self._eval(self.base_llm, d, ("language",))
        vlm_dir = d / "vlm"
        if not export_complete(vlm_dir):
            self._save_untrained_vlm(vlm_dir)
        vis_dir = d / "vision"
        vis_dir.mkdir(exist_ok=True)
        vis = self._eval(str(vlm_dir), vis_dir, ("vision",))
        merged = {"tasks": {**lang["tasks"], **vis["tasks"]},
                  "language_avg": lang.get("language_avg"), "vision_avg": vis.get("vision_avg")}
        if all("records" in t for t in merged["tasks"].values()):
            save_results(merged, d / "eval-all.json")  # + eval-all.items.jsonl: every arm is paired with it
        else:
            write_text_atomic(d / "eval-all.json", json.dumps(merged, indent=2) + "\n")
        docs = heldout_doc_losses(self.base_llm, self.alpaca, self.settings.heldout_docs)
        row = self._row("base", None, merged, _loss_of(docs))
        row.update(heldout_docs=docs, heldout_loss_ci95=list(loss_interval(docs)))
        row["seconds"] = time.perf_counter() - t0
        row["commands"] = [f"rm -rf {d} && {self.again}  # the base LLM (language) and the untrained VLM (vision)"]
        return self._finish("base", row)

    def _save_untrained_vlm(self, out: Path) -> None:
        fc = get_family(self.recipe.model).family_config()
        torch.manual_seed(self.recipe.train.seed)
        model = build_model(self.recipe.model, fc)
        model.save_pretrained(out, safe_serialization=True)
        save_processor(self.recipe, fc, out)

    def trained(self, cell: str, ratio: float, extra: list[str], build_from: str | None = None) -> dict:
        """Build (unless another cell's build is reused), train, evaluate one arm."""
        done = self._done(cell)
        if done:
            return done
        t0 = time.perf_counter()
        d = self.out / cell
        d.mkdir(parents=True, exist_ok=True)
        sets = [*self.settings.overrides, f"mixture.ratio.text={ratio}"]
        build = self.out / (build_from or cell) / "build"
        final = d / "run" / "final"
        steps = [Step("build", cell, build, build_complete,  # a reused build: skipped unless it went missing
                      argv=("build", str(self.recipe_path), "--out", str(build), "--cache", str(self.cache),
                            *_sets(sets))),
                 Step("train", cell, final, export_complete,
                      argv=("train", str(self.recipe_path), "--shards", str(build), "--out", str(d / "run"),
                            "--nproc", str(self.nproc), "--resume", *_sets([*sets, *extra])))]
        times = {f"{r.step.kind}_s": r.seconds for r in self.pipeline.run(steps) if r.ran}
        t = time.perf_counter()
        results = self._eval(str(final), d)
        times["eval_s"] = time.perf_counter() - t
        docs = heldout_doc_losses(str(final), self.alpaca, self.settings.heldout_docs)
        row = self._row(cell, ratio, results, _loss_of(docs))
        row.update(heldout_docs=docs, heldout_loss_ci95=list(loss_interval(docs)))
        manifest = json.loads((build / "manifest.json").read_text())
        by_mod = manifest["totals"].get("tokens_by_modality", {})
        row.update(tokens_text=int(by_mod.get("text", 0)), tokens_image_text=int(by_mod.get("image_text", 0)),
                   tokens_total=int(manifest["totals"]["tokens"]), step_s=step_seconds(d / "run"),
                   train_tokens_per_s=mean_tokens_per_s(d / "run"), seconds=time.perf_counter() - t0, **times)
        row["commands"] = self._commands([f"mixture.ratio.text={ratio}", *extra], d, build)
        return self._finish(cell, row)

    def merge(self, vlm_cell: str) -> list[dict]:
        done = self._done("merge")
        if done:
            return done["points"]
        t0 = time.perf_counter()
        ev = self.recipe.eval
        tasks = tuple({"name": t.name, "path": t.path, "kind": t.kind, "format": t.format, "group": t.group,
                       "images": t.images, "limit": t.limit} for t in self._tasks())
        vlm = str(self.out / vlm_cell / "run" / "final")
        spec = SweepSpec(vlm=vlm, llm=self.base_llm, alphas=self.settings.alphas, densities=self.settings.densities,
                         tasks=tasks, out=self.out / "merge", limit=ev.limit, batch_size=ev.batch_size,
                         max_new_tokens=ev.max_new_tokens)
        sweep = self.out / "merge" / "sweep.json"
        merged = self.pipeline.run_step(Step(
            "merge", "merge", sweep, sweep_complete, call=lambda: merge_sweep(spec),
            note=f"α {list(spec.alphas)} × K {list(spec.densities)} of {vlm} with the base LLM"))
        rows = merged.value if merged.ran else json.loads(sweep.read_text())
        points = []
        for r in rows:
            res = load_results(self.out / "merge" / r["point"] / "results.json")
            p = self._row(f"merge α={r['alpha']:g} K={r['density']:g}", None, res, None)
            p.update(alpha=r["alpha"], density=r["density"],
                     command=f"mlan merge --vlm {vlm} --llm {self.base_llm} --alpha {r['alpha']:g} "
                             f"--density {r['density']:g} --out MERGED  # scored by: rm -rf "
                             f"{self.out / 'merge' / r['point']} {self.out / 'merge' / 'result.json'} && {self.again}")
            points.append(p)
        self._finish("merge", {"points": points, "seconds": time.perf_counter() - t0})
        return points

    def _row(self, cell: str, ratio: float | None, results: dict, loss: float | None) -> dict:
        row: dict[str, Any] = {"cell": cell, "text_ratio": ratio, "language_avg": results.get("language_avg"),
                               "vision_avg": results.get("vision_avg"), "heldout_loss": loss,
                               "groups": {n: t["group"] for n, t in results["tasks"].items()},
                               **{n: t["accuracy"] for n, t in results["tasks"].items()}, **score_stats(results)}
        for group in ("language", "vision"):
            accs = [t["accuracy"] for t in results["tasks"].values() if t["group"] == group]
            row[f"omega_{group}"] = harmonic_mean(accs) if accs else None
            counts = [(st["correct"], st["n"]) for n, st in row["stats"].items() if row["groups"][n] == group]
            if counts:
                row[f"omega_{group}_ci95"] = list(group_ci(counts, harmonic_of))
        # GSM8K at ~0 % (a 135M model, 0-shot) sends the harmonic mean to 0 for every arm: ω over the
        # choice tasks alone is reported beside it
        choice = [t["accuracy"] for t in results["tasks"].values() if t["group"] == "language" and t["kind"] == "choice"]
        row["omega_language_choice"] = harmonic_mean(choice) if choice else None
        choice_counts = [(row["stats"][n]["correct"], row["stats"][n]["n"]) for n, t in results["tasks"].items()
                         if t["group"] == "language" and t["kind"] == "choice" and n in row["stats"]]
        if choice_counts:
            row["omega_language_choice_ci95"] = list(group_ci(choice_counts, harmonic_of))
        base = self.out / "base" / "eval-all.json"
        if base.is_file() and cell != "base":
            base_results = load_results(base)
            fg = forgetting(base_results, results, "base")["groups"]
            row["delta_language"] = fg.get("language", {}).get("delta")
            row["delta_vision"] = fg.get("vision", {}).get("delta")
            row["paired_vs_base"] = paired_vs_base(base_results, results)
        return row


def paired_vs_base(base: dict, results: dict) -> dict[str, dict]:
    """Each score of `results` minus the base's, paired item by item on the same items: per task (with the
    exact McNemar p), the group averages, ω and ω over the choice tasks; empty where records are missing."""
    out: dict[str, dict] = {}
    shared = [n for n, t in results["tasks"].items() if t.get("records") and base["tasks"].get(n, {}).get("records")]
    tables = {n: paired_counts(*aligned_correct(n, base["tasks"][n]["records"], results["tasks"][n]["records"]))
              for n in shared}
    for n, t in tables.items():
        diff, ci = paired_group_difference([t])
        out[n] = {"difference": diff, "ci95": list(ci), "p": mcnemar_exact_p(t.a_only, t.b_only)}
    for group in ("language", "vision"):
        names = [n for n in shared if results["tasks"][n]["group"] == group]
        choice = [n for n in names if results["tasks"][n].get("kind") == "choice"]
        for key, members, statistic in ((f"{group}_avg", names, mean_of), (f"omega_{group}", names, harmonic_of),
                                        (f"omega_{group}_choice", choice, harmonic_of)):
            if members:
                diff, ci = paired_group_difference([tables[n] for n in members], statistic)
                out[key] = {"difference": diff, "ci95": list(ci)}
    return out


# ---------------------------------------------------------------- power
DEFAULT_DISCORDANCE = {"language": 0.15, "vision": 0.30}
"""Assumed share of items on which an arm and the base disagree when no pilot has measured it: a fine-tuned
model changes a minority of a language benchmark's answers; a vision task still being learnt changes more.
Assumptions, not measurements: the statement names which one it used."""
TARGET_DIFFERENCE = {"language": 2.0, "vision": 10.0}  # points the study must be able to see (issue #21)


def measured_discordance(out: Path) -> tuple[dict[str, float], str] | None:
    """Per-task discordance between the base and the first finished arm that kept per-item records (a pilot)."""
    base = out / "base" / "eval-all.json"
    if not base.is_file():
        return None
    base_results = load_results(base)
    for arm in sorted(out.glob("ratio-*/eval.json")):
        arm_results = load_results(arm)
        rates = {}
        for n, t in arm_results["tasks"].items():
            if t.get("records") and base_results["tasks"].get(n, {}).get("records"):
                c = paired_counts(*aligned_correct(n, base_results["tasks"][n]["records"], t["records"]))
                rates[n] = c.discordant / c.n
        if rates:
            return rates, f"measured between the base and {arm.parent.name}"
    return None


def _points(mdd: float) -> str:
    return "none" if mdd == float("inf") else f"{mdd:.1f}"


def power_statement(task_sizes: list[tuple[str, str, int]], measured: tuple[dict[str, float], str] | None) -> str:
    """Per task (name, group, n) and pooled per group: the smallest paired difference (points) a McNemar test
    at 5 % two-sided detects with 80 % power, and whether the study can see the targets (2 points language
    pooled, 10 points vision)."""
    rates, source = measured if measured else ({}, "")
    lines = [("Power (before training): smallest paired difference an arm-vs-base McNemar test detects "
              "(5 % two-sided, 80 % power; Connor's approximation):"), ""]
    lines += ["| task | group | n | discordance | detectable difference (points) |", "|---|---|---:|---:|---:|"]
    pooled: dict[str, list[tuple[int, float]]] = {}
    for name, group, n in task_sizes:
        rate = rates.get(name, DEFAULT_DISCORDANCE.get(group, 0.2))
        how = "measured" if name in rates else "assumed"
        mdd = min_detectable_difference(n, rate) if n > 0 and rate > 0 else float("inf")  # 0: arms never differ
        lines.append(f"| {name} | {group} | {n:,} | {100 * rate:.0f} % ({how}) | {_points(mdd)} |")
        pooled.setdefault(group, []).append((n, rate))
    verdicts = []
    for group, parts in pooled.items():
        n = sum(k for k, _ in parts)
        rate = sum(k * r for k, r in parts) / n if n else 0.0
        mdd = min_detectable_difference(n, rate) if n > 0 and rate > 0 else float("inf")
        lines.append(f"| **pooled {group}** | {group} | {n:,} | {100 * rate:.0f} % | **{_points(mdd)}** |")
        target = TARGET_DIFFERENCE.get(group)
        if target is not None:
            can = mdd <= target
            verdicts.append(f"- {group}: the pooled score over {n:,} items {'can' if can else 'CANNOT'} see a "
                            f"{target:g}-point {group} difference ("
                            + (f"smallest detectable: {mdd:.1f} points)" if mdd != float("inf")
                               else "no difference is detectable at this n)")
                            + ("." if can else "; smaller differences will read as 'no difference detected'."))
    lines += ["", *verdicts, "",
              ("Discordance: " + (source + "; " if source else "") + "tasks marked 'assumed' use mlan's defaults "
               f"({', '.join(f'{g} {100 * r:.0f} %' for g, r in DEFAULT_DISCORDANCE.items())}), an assumption "
               "until a pilot measures it.")]
    return "\n".join(lines)


# ---------------------------------------------------------------- report
def _f(v: Any, digits: int = 1) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _cell_of(r: dict, key: str, digits: int) -> str:
    """A score with ± (its 95 % interval), a paired difference from the base ('vs_base:KEY'), or a plain value."""
    if key.startswith("vs_base:"):
        d = r.get("paired_vs_base", {}).get(key.removeprefix("vs_base:"))
        return difference_cell(d["difference"], d["ci95"], d.get("p")) if d else "–"
    st = r.get("stats", {}).get(key)
    if st:
        return score_cell(r.get(key), st["ci95"], digits)
    if r.get(f"{key}_ci95") and r.get(key) is not None:
        return score_cell(r[key], r[f"{key}_ci95"], digits)
    return _f(r.get(key), digits)


def _table(rows: list[dict], cols: list[tuple[str, str, int]]) -> str:
    lines = ["| " + " | ".join(h for h, _, _ in cols) + " |", "|" + "|".join("---:" for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_cell_of(r, k, n) for _, k, n in cols) + " |")
    return "\n".join(lines)


def _paired_table(rows: list[dict], lang_tasks: list[str], vis_tasks: list[str]) -> str:
    """Every arm minus the base, paired on the same items: per task (exact McNemar p) and per group."""
    cols = [("arm", "cell", 0), *((f"{n} Δ", f"vs_base:{n}", 1) for n in lang_tasks),
            ("language avg Δ", "vs_base:language_avg", 1), ("ω lang Δ", "vs_base:omega_language", 1),
            ("ω lang (choice) Δ", "vs_base:omega_language_choice", 1), *((f"{n} Δ", f"vs_base:{n}", 1) for n in vis_tasks),
            ("vision avg Δ", "vs_base:vision_avg", 1)]
    return _table([r for r in rows if r.get("paired_vs_base")], cols)


def write_report(study: Study, started: float) -> None:
    """OUT/report.md, OUT/study.csv and OUT/ratio.png from every finished cell's result.json."""
    out = study.out
    rows = _result_rows(out)
    base = rows.get("base")
    lang_tasks = [t.name for t in study.recipe.eval.tasks if t.group == "language"]
    vis_tasks = [t.name for t in study.recipe.eval.tasks if t.group == "vision"]
    ratio_rows = sorted((r for c, r in rows.items() if c.startswith("ratio-")), key=lambda r: r["text_ratio"])
    score_cols = _score_columns(lang_tasks, vis_tasks)
    sizes = next((r["stats"] for r in rows.values() if r.get("stats")), {})
    score_cols = [(f"{h} (n={sizes[k]['n']})" if k in sizes else h, k, d) for h, k, d in score_cols]
    lines = _report_head(study)
    if (out / "power.md").is_file():
        lines += ["## 0. Power", "", (out / "power.md").read_text().strip(), ""]
    if base:
        lines += ["## 1. Base", "", ("Language: the base LLM. Vision: the composed VLM before training (random "
                  "tower, fresh projector): chance level expected."), "", _table([base], score_cols), ""]
    if ratio_rows:
        lines += ["## 2. Ratio sweep (text share of the token budget; same budget, seed and settings)", "",
                  _table(ratio_rows, [("text ratio", "text_ratio", 2), ("text tokens", "tokens_text", 0),
                                      ("image-text tokens", "tokens_image_text", 0), *score_cols]), "",
                  "![ratio sweep](ratio.png)", ""]
    arms = [r for c in ("soft-targets", "lora") if (r := rows.get(c))]
    low = rows.get(ratio_tag(min(study.settings.ratios)))
    if arms and low:
        lines += [(f"## 3. Vision-heaviest mixture (text ratio {min(study.settings.ratios):g}): plain FT, Soft Targets, "
                  "rsLoRA"), "", _table([low, *arms], [("arm", "cell", 0), *score_cols]), ""]
    arm_rows = [r for c, r in rows.items() if c != "base" and r.get("paired_vs_base")]
    merge_points = rows["merge"]["points"] if "merge" in rows else []
    if arm_rows or any(p.get("paired_vs_base") for p in merge_points):
        lines += [("## Paired comparison with the base (arm − base, points, [95 % paired bootstrap], exact McNemar "
                   "p per task)"), "", _paired_table([*arm_rows, *merge_points], lang_tasks, vis_tasks), "",
                  chance_line(rows), ""]
    merge = rows.get("merge")
    if merge:
        lines += ["## 4. Merge sweep of the vision-heaviest model with the base LLM (α × K)", "",
                  _table(merge["points"], [("α", "alpha", 2), ("K", "density", 2), *score_cols]), "",
                  "![merge sweep](merge/sweep.png)", ""]
    lines += _report_tail(rows, started)
    write_text_atomic(out / "report.md", "\n".join(lines) + "\n")
    flat = [r for r in rows.values() if "language_avg" in r] + (merge["points"] if merge else [])
    _write_csv(out / "study.csv", flat, lang_tasks, vis_tasks)
    if ratio_rows:
        write_plot(ratio_rows, out / "ratio.png", f"{study.recipe.model.llm}: ratio sweep (random vision tower)")


def _result_rows(out: Path) -> dict[str, dict]:
    """Every finished cell's result.json by cell name, with the figures derived across cells (seconds per step,
    Δ against the base on the choice tasks, HM of language and vision, Δ held-out loss)."""
    cells = sorted((p.parent.name for p in out.glob("*/result.json")), key=str)
    rows = {c: json.loads((out / c / "result.json").read_text()) for c in cells}
    base = rows.get("base")
    hm = lambda r: (harmonic_mean([r["language_avg"], r["vision_avg"]])
                    if r.get("language_avg") is not None and r.get("vision_avg") is not None else None)
    base_choice = base.get("omega_language_choice") if base else None
    for c, r in rows.items():
        if (out / c / "run").is_dir():
            r["step_s"] = step_seconds(out / c / "run")
        if r.get("omega_language_choice") is not None and base_choice is not None and c != "base":
            r["delta_language_choice"] = base_choice - r["omega_language_choice"]
    for r in [*rows.values(), *(rows["merge"]["points"] if "merge" in rows else [])]:
        if isinstance(r, dict) and "language_avg" in r:
            if r.get("omega_language_choice") is not None and base_choice is not None and "alpha" in r:
                r["delta_language_choice"] = base_choice - r["omega_language_choice"]
            r["hm_lang_vision"] = hm(r)
            if base and r.get("heldout_loss") is not None and base.get("heldout_loss") is not None:
                r["heldout_loss_delta"] = r["heldout_loss"] - base["heldout_loss"]
                if r.get("heldout_docs") and len(r["heldout_docs"]) == len(base.get("heldout_docs") or []):
                    r["heldout_loss_delta_ci95"] = list(loss_interval(r["heldout_docs"], base["heldout_docs"]))
    return rows


def _score_columns(lang_tasks: list[str], vis_tasks: list[str]) -> list[tuple[str, str, int]]:
    """(header, key, digits) of the score columns every table shares."""
    return ([(n, n, 1) for n in lang_tasks] + [("language avg", "language_avg", 1),
            ("ω lang", "omega_language", 1), ("Δ lang avg vs base [95 % paired]", "vs_base:language_avg", 1),
            ("ω lang (choice tasks)", "omega_language_choice", 1),
            ("Δ ω (choice tasks) [95 % paired]", "vs_base:omega_language_choice", 1),
            ("held-out loss", "heldout_loss", 3), ("Δ loss vs base (± paired over documents)", "heldout_loss_delta", 3)]
            + [(n, n, 1) for n in vis_tasks] + [("vision avg", "vision_avg", 1), ("ω vision", "omega_vision", 1),
            ("HM(lang, vision)", "hm_lang_vision", 1)])


def chance_line(rows: dict[str, dict]) -> str:
    """The chance level of every task, from any row that recorded it."""
    levels: dict[str, float] = {}
    for r in rows.values():
        for n, st in r.get("stats", {}).items():
            if st.get("chance") is not None:
                levels.setdefault(n, st["chance"])
    return "Chance level: " + (", ".join(f"{n} {c:.1f} %" for n, c in levels.items()) or "not recorded") + "."


def _report_head(study: Study) -> list[str]:
    """The title, the vision note and how to read the numbers."""
    return [f"# MLAN study on {study.recipe.model.llm}" + (" (--quick smoke run: numbers mean nothing)"
                                                           if study.quick else ""), "",
            f"**{VISION_NOTE}**", "",
            (f"Recipe: `{study.recipe_src}` (as run: `{study.recipe_path}`). Overrides: "
             f"{', '.join(study.settings.overrides) or 'none'}. Accuracies in % ± half the 95 % interval (Wilson per "
             "task; averages and ω: bootstrap over items); n items per task in each header. Δ vs base: the arm "
             "minus the base on the same items, with a paired bootstrap 95 % interval. ω = harmonic mean of a group's "
             "accuracies, Δ = ω(base) − ω(model) (> 0 is forgetting), HM = harmonic mean of language and vision "
             "averages. Held-out loss: mean answer-token loss on alpaca records "
             f"[{ALPACA_HELD_OUT_FROM}, {ALPACA_HELD_OUT_FROM + study.settings.heldout_docs}) (never trained on), "
             "± half its bootstrap 95 % interval over documents (Δ loss: the same documents, resampled jointly)."), ""]


def _report_tail(rows: dict[str, dict], started: float) -> list[str]:
    """Wall time per cell, how to re-run a cell (with each cell's commands), and the notes."""
    timing = [{"cell": c, **{k: r.get(k) for k in ("build_s", "train_s", "eval_s", "step_s", "train_tokens_per_s",
                                                     "seconds")}} for c, r in rows.items()]
    lines = ["## 5. Wall time (seconds) and how to re-run a cell", "",
             _table(timing, [("cell", "cell", 0), ("build", "build_s", 0), ("train", "train_s", 0),
                             ("eval", "eval_s", 0), ("s / step", "step_s", 2),
                             ("train tok/s", "train_tokens_per_s", 0), ("cell total", "seconds", 0)]), "",
             f"Study wall time so far (this invocation): {time.time() - started:.0f} s.", ""]
    lines += [("Re-run any cell: delete `OUT/<cell>/result.json` (and the parts to redo: `build/`, `run/`, "
              "`eval.json`) and run the study again; or run its commands by hand:"), ""]
    for c, r in rows.items():
        cmds = r.get("commands") or [p.get("command") for p in r.get("points", [])]
        lines += [f"- `{c}`:"] + [f"  - `{x}`" for x in cmds if x]
    lines += ["", "## Notes", "", ("- Null effects are reported as measured: differences of a few points on these "
              "subsets are within one or two items and are not evidence either way."), ""]
    return lines


def _write_csv(path: Path, flat: list[dict], lang_tasks: list[str], vis_tasks: list[str]) -> None:
    """study.csv: one line per cell and merge point."""
    keys = ["cell", "text_ratio", "alpha", "density", *lang_tasks, "language_avg", "omega_language",
            "delta_language", "omega_language_choice", "delta_language_choice", "heldout_loss", "heldout_loss_delta",
            *vis_tasks, "vision_avg", "omega_vision",
            "delta_vision", "hm_lang_vision", "tokens_text", "tokens_image_text", "step_s", "seconds"]
    keys += [f"{n}_{x}" for n in [*lang_tasks, *vis_tasks] for x in ("n", "ci95_lo", "ci95_hi", "chance")]
    keys += [f"{k}_ci95_{e}" for k in ("language_avg", "vision_avg", "omega_language", "omega_vision") for e in ("lo", "hi")]
    keys += [f"{k}_vs_base_{e}" for k in ("language_avg", "omega_language_choice", "vision_avg")
             for e in ("difference", "ci95_lo", "ci95_hi")]
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(keys)
        for r in map(_csv_fields, flat):
            w.writerow(["" if r.get(k) is None else r.get(k) for k in keys])


def _csv_fields(r: dict) -> dict:
    """A row with its n, interval ends, chance and paired differences as flat CSV fields."""
    flat = dict(r)
    for n, st in r.get("stats", {}).items():
        flat.update({f"{n}_n": st["n"], f"{n}_ci95_lo": st["ci95"][0], f"{n}_ci95_hi": st["ci95"][1],
                     f"{n}_chance": st["chance"]})
    for k in ("language_avg", "vision_avg", "omega_language", "omega_vision"):
        if r.get(f"{k}_ci95"):
            flat.update({f"{k}_ci95_lo": r[f"{k}_ci95"][0], f"{k}_ci95_hi": r[f"{k}_ci95"][1]})
    for k, d in r.get("paired_vs_base", {}).items():
        flat.update({f"{k}_vs_base_difference": d["difference"], f"{k}_vs_base_ci95_lo": d["ci95"][0],
                     f"{k}_vs_base_ci95_hi": d["ci95"][1]})
    return flat


def power_only(out: str | Path = "study-out", recipe: str | Path = DEFAULT_RECIPE, quick: bool = False) -> str:
    """The power statement alone (`mlan study --power-only`): prepares OUT's data, trains nothing."""
    settings = StudySettings.quick() if quick else StudySettings()
    return Study(Path(recipe).resolve(), Path(out), settings, 1, quick, lambda msg: None).power()


def run_study(out: str | Path = "study-out", recipe: str | Path = DEFAULT_RECIPE, quick: bool = False,
              nproc: int = 1, log: Callable[[str], None] | None = None) -> Path:
    """Every cell not finished yet, in order; returns OUT/report.md."""
    log = log or (lambda msg: progress.say(f"[mlan study] {msg}"))
    started = time.time()
    settings = StudySettings.quick() if quick else StudySettings()
    study = Study(Path(recipe).resolve(), Path(out), settings, nproc, quick, log)
    for line in study.power().splitlines():  # before the first training step: can this study see anything?
        log(line)
    steps: list[tuple[str, Callable[[], Any]]] = [("base", study.base)]
    low = ratio_tag(min(settings.ratios))
    for r in sorted(settings.ratios):
        steps.append((ratio_tag(r), lambda r=r: study.trained(ratio_tag(r), r, [])))
    steps.append(("soft-targets", lambda: study.trained("soft-targets", min(settings.ratios),
                                                        ["train.soft_targets=0.01"], build_from=low)))
    steps.append(("lora", lambda: study.trained("lora", min(settings.ratios), ["train.lora.enabled=true"],
                                                build_from=low)))
    steps.append(("merge", lambda: study.merge(low)))
    planned = {"base": 2, "merge": 1}  # runner steps per cell (a trained cell: build, train, eval)
    study.pipeline.total = sum(planned.get(name, 3) for name, _ in steps if study._done(name) is None)
    for name, step in steps:
        t0 = time.perf_counter()
        log(f"{name}: start")
        step()
        log(f"{name}: done in {time.perf_counter() - t0:.0f}s")
        study.report(started)
    total = study.out / "wall.json"
    write_text_atomic(total, json.dumps({"last_invocation_s": time.time() - started}) + "\n")
    return study.out / "report.md"
