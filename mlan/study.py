"""`mlan study`: the MLAN study on a real pretrained LLM (SmolLM2-135M-Instruct), offline, on a CPU.

Cells, each finished once and read back afterwards (OUT/<cell>/result.json is written last, atomically):
  base            the base LLM's language scores and held-out text loss; the untrained composed VLM's vision
  ratio-R         build → train → eval at text ratio R (same token budget, seed and settings for every R)
  soft-targets    the vision-heaviest mixture (lowest ratio) with train.soft_targets = 0.01
  lora            the vision-heaviest mixture with rsLoRA on the language model
  merge           task-vector merges (α × K) of the vision-heaviest model with the base LLM
The vision tower is a small *randomly initialised* CLIP (no CLIP/SigLIP weights are reachable offline): it is
frozen (stage 2), so vision skill comes from the trained projector and LM alone. Writes OUT/report.md,
OUT/study.csv, OUT/ratio.png and OUT/merge/sweep.png after every cell.
"""
from __future__ import annotations

import csv
import json
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from mlan.ablate import _mlan, _sets, export_complete, ratio_tag, write_plot
from mlan.atomic_write import write_text_atomic
from mlan.data.labels import IGNORE_INDEX
from mlan.errors import UserError
from mlan.eval.forgetting import forgetting, harmonic_mean
from mlan.eval.harness import evaluate, load_model
from mlan.families.modeling import build_model
from mlan.families.registry import get_family
from mlan.merge import SweepSpec, merge_sweep
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
    if not nlvr_eval.is_file():
        records = [json.loads(line) for line in (shared / "dev.json").read_text().splitlines() if line.strip()]
        rows = []
        for r in records[NLVR_HELD_OUT_FROM:]:
            image = shared / "images" / str(r["directory"]) / f"dev-{r['identifier']}-0.png"
            rows.append({"question": f"Is the following statement true or false for this picture?\n\"{r['sentence']}\"",
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
def heldout_loss(model_dir: str, alpaca: Path, n_docs: int) -> float:
    """Mean per-token loss on the answers of held-out alpaca records, rendered with the model's chat template."""
    lm = load_model(model_dir)
    tok = lm.tokenizer
    records = json.loads(alpaca.read_text())[ALPACA_HELD_OUT_FROM:ALPACA_HELD_OUT_FROM + n_docs]
    total, count = 0.0, 0
    for r in records:
        user = (r["instruction"] + ("\n" + r["input"] if r.get("input") else "")).strip()
        msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": r["output"].strip()}]
        prompt = tok.apply_chat_template(msgs[:1], tokenize=True, add_generation_prompt=True, return_dict=False)
        full = tok.apply_chat_template(msgs, tokenize=True, return_dict=False)[:512]
        ids = torch.tensor([full])
        logits = lm.model(input_ids=ids, use_cache=False).logits[0, :-1].float()
        targets = ids[0, 1:].clone()
        targets[: len(prompt) - 1] = IGNORE_INDEX
        total += float(torch.nn.functional.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX,
                                                         reduction="sum"))
        count += int((targets != IGNORE_INDEX).sum())
    return total / max(count, 1)


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

    # -- helpers
    def _done(self, cell: str) -> dict | None:
        f = self.out / cell / "result.json"
        return json.loads(f.read_text()) if f.is_file() else None

    def _finish(self, cell: str, row: dict) -> dict:
        write_text_atomic(self.out / cell / "result.json", json.dumps(row, indent=2) + "\n")
        return row

    def _eval(self, model: str, cell: Path, groups: tuple[str, ...] = ("language", "vision")) -> dict:
        f = cell / "eval.json"
        if f.is_file():
            return json.loads(f.read_text())
        ev = self.recipe.eval
        tasks = [t for t in self._tasks() if (t.group or "language") in groups]
        results = evaluate(model, tasks, batch_size=ev.batch_size, limit=ev.limit, max_new_tokens=ev.max_new_tokens)
        write_text_atomic(f, json.dumps(results, indent=2) + "\n")
        return results

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
        write_text_atomic(d / "eval-all.json", json.dumps(merged, indent=2) + "\n")
        row = self._row("base", None, merged, heldout_loss(self.base_llm, self.alpaca, self.settings.heldout_docs))
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
        times = {}
        if not (build / "manifest.json").is_file():
            t = time.perf_counter()
            _mlan(["build", str(self.recipe_path), "--out", str(build), "--cache", str(self.cache), *_sets(sets)],
                  self.log)
            times["build_s"] = time.perf_counter() - t
        final = d / "run" / "final"
        if not export_complete(final):
            t = time.perf_counter()
            _mlan(["train", str(self.recipe_path), "--shards", str(build), "--out", str(d / "run"),
                   "--nproc", str(self.nproc), "--resume", *_sets([*sets, *extra])], self.log)
            times["train_s"] = time.perf_counter() - t
        t = time.perf_counter()
        results = self._eval(str(final), d)
        times["eval_s"] = time.perf_counter() - t
        row = self._row(cell, ratio, results, heldout_loss(str(final), self.alpaca, self.settings.heldout_docs))
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
        self.log(f"merge sweep: α {list(spec.alphas)} × K {list(spec.densities)} of {vlm} with the base LLM")
        rows = merge_sweep(spec)
        points = []
        for r in rows:
            res = json.loads((self.out / "merge" / r["point"] / "results.json").read_text())
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
                               **{n: t["accuracy"] for n, t in results["tasks"].items()}}
        for group in ("language", "vision"):
            accs = [t["accuracy"] for t in results["tasks"].values() if t["group"] == group]
            row[f"omega_{group}"] = harmonic_mean(accs) if accs else None
        # GSM8K at ~0 % (a 135M model, 0-shot) sends the harmonic mean to 0 for every arm: ω over the
        # choice tasks alone is reported beside it
        choice = [t["accuracy"] for t in results["tasks"].values() if t["group"] == "language" and t["kind"] == "choice"]
        row["omega_language_choice"] = harmonic_mean(choice) if choice else None
        base = self.out / "base" / "eval-all.json"
        if base.is_file() and cell != "base":
            fg = forgetting(json.loads(base.read_text()), results, "base")["groups"]
            row["delta_language"] = fg.get("language", {}).get("delta")
            row["delta_vision"] = fg.get("vision", {}).get("delta")
        return row


# ---------------------------------------------------------------- report
def _f(v: Any, digits: int = 1) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _table(rows: list[dict], cols: list[tuple[str, str, int]]) -> str:
    lines = ["| " + " | ".join(h for h, _, _ in cols) + " |", "|" + "|".join("---:" for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_f(r.get(k), n) for _, k, n in cols) + " |")
    return "\n".join(lines)


def write_report(study: Study, started: float) -> None:
    """OUT/report.md, OUT/study.csv and OUT/ratio.png from every finished cell's result.json."""
    out = study.out
    rows = _result_rows(out)
    base = rows.get("base")
    lang_tasks = [t.name for t in study.recipe.eval.tasks if t.group == "language"]
    vis_tasks = [t.name for t in study.recipe.eval.tasks if t.group == "vision"]
    ratio_rows = sorted((r for c, r in rows.items() if c.startswith("ratio-")), key=lambda r: r["text_ratio"])
    score_cols = _score_columns(lang_tasks, vis_tasks)
    lines = _report_head(study)
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
    return rows


def _score_columns(lang_tasks: list[str], vis_tasks: list[str]) -> list[tuple[str, str, int]]:
    """(header, key, digits) of the score columns every table shares."""
    return ([(n, n, 1) for n in lang_tasks] + [("language avg", "language_avg", 1),
            ("ω lang", "omega_language", 1), ("Δ lang vs base", "delta_language", 1),
            ("ω lang (choice tasks)", "omega_language_choice", 1), ("Δ (choice tasks)", "delta_language_choice", 1),
            ("held-out loss", "heldout_loss", 3), ("Δ loss", "heldout_loss_delta", 3)]
            + [(n, n, 1) for n in vis_tasks] + [("vision avg", "vision_avg", 1), ("ω vision", "omega_vision", 1),
            ("HM(lang, vision)", "hm_lang_vision", 1)])


def _report_head(study: Study) -> list[str]:
    """The title, the vision note and how to read the numbers."""
    return [f"# MLAN study on {study.recipe.model.llm}" + (" (--quick smoke run: numbers mean nothing)"
                                                           if study.quick else ""), "",
            f"**{VISION_NOTE}**", "",
            (f"Recipe: `{study.recipe_src}` (as run: `{study.recipe_path}`). Overrides: "
             f"{', '.join(study.settings.overrides) or 'none'}. Accuracies in %, n items per task as in the "
             "recipe's eval limits (small subsets: one item is worth several points). ω = harmonic mean of a group's "
             "accuracies, Δ = ω(base) − ω(model) (> 0 is forgetting), HM = harmonic mean of language and vision "
             "averages. Held-out loss: mean answer-token loss on alpaca records "
             f"[{ALPACA_HELD_OUT_FROM}, {ALPACA_HELD_OUT_FROM + study.settings.heldout_docs}) (never trained on)."), ""]


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
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(keys)
        for r in flat:
            w.writerow(["" if r.get(k) is None else r.get(k) for k in keys])


def run_study(out: str | Path = "study-out", recipe: str | Path = DEFAULT_RECIPE, quick: bool = False,
              nproc: int = 1, log: Callable[[str], None] | None = None) -> Path:
    """Every cell not finished yet, in order; returns OUT/report.md."""
    log = log or (lambda msg: print(f"[mlan study] {msg}", file=sys.stderr, flush=True))
    started = time.time()
    settings = StudySettings.quick() if quick else StudySettings()
    study = Study(Path(recipe).resolve(), Path(out), settings, nproc, quick, log)
    steps: list[tuple[str, Callable[[], Any]]] = [("base", study.base)]
    low = ratio_tag(min(settings.ratios))
    for r in sorted(settings.ratios):
        steps.append((ratio_tag(r), lambda r=r: study.trained(ratio_tag(r), r, [])))
    steps.append(("soft-targets", lambda: study.trained("soft-targets", min(settings.ratios),
                                                        ["train.soft_targets=0.01"], build_from=low)))
    steps.append(("lora", lambda: study.trained("lora", min(settings.ratios), ["train.lora.enabled=true"],
                                                build_from=low)))
    steps.append(("merge", lambda: study.merge(low)))
    for name, step in steps:
        t0 = time.perf_counter()
        log(f"{name}: start")
        step()
        log(f"{name}: done in {time.perf_counter() - t0:.0f}s")
        write_report(study, started)
    total = study.out / "wall.json"
    write_text_atomic(total, json.dumps({"last_invocation_s": time.time() - started}) + "\n")
    return study.out / "report.md"
