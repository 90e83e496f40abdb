"""Kill `mlan build`, `train --nproc 2`, `merge`, `eval`, `continual` and `study` with SIGKILL at seeded random
moments, rerun or resume, compare with an uninterrupted run.

For each command: one uninterrupted reference run, then N trials. A trial starts the command in a session of
its own, SIGKILLs the `mlan` process alone (as `kill -9 PID` from a shell would) after a seeded random delay
(a fraction in [0.05, 0.9] of the fastest complete run seen so far; a run that finishes before its kill teaches
a faster wall time and the trial is tried again, up to 3 times, with the same fraction), counts the processes it
had started that are still alive 5 s later (then kills them so the next trial starts clean), and runs the same
command again in the same folder (`--resume` for train). What must come out identical to the reference:
- build: every shard and manifest.json, byte for byte;
- train: the final weights, within 1e-6;
- merge: every file of the merged folder (safetensors, config) but merge.json (its wall time), byte for byte;
- eval: the results JSON and its per-item file, byte for byte;
- continual: matrix.csv and forgetting.json, byte for byte;
- study (--quick, a recipe with one item per task): report.md without its wall-time section and study.csv
  without its timing columns.
A rerun that finds the killed run's lock prints "took over the lock": those are counted as stale-lock takeovers.

    python tools/chaos.py [--commands build,train,merge,eval,continual,study] [--kills 10] [--seed 0] [--work DIR]
(needs ../shared/data; build and train ~1 min per kill, merge and eval seconds, continual and study minutes)
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from safetensors.torch import load_file

from mlan.child_process import alive, descendants
from mlan.recipe import expand_env

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MLAN_SHARED_DATA", REPO.parent / "shared" / "data"))
GRACE_S = 5.0
COMMANDS = ("build", "train", "merge", "eval", "continual", "study")
BUILD_SETS = ["--set", "mixture.budget.tokens=20000", "--set", "shards.target_tokens=4000"]
TRAIN_SETS = ["--set", "train.budget_tokens=6000", "--set", "train.checkpoint_every_tokens=1500",
              "--set", "train.grad_accum=1", "--set", "train.loader_workers=1"]
SOURCE_LIMIT = 300  # records per source: tokenizing stays a few seconds, the kill still lands in every phase
# continual: the language task and one VL task (the fewest with a forgetting score), tiny budgets
CONTINUAL_SETS = ["tasks.language.budget.tokens=3000", "tasks.colours.budget.examples=40", "base.eval.limit=8"]
EVAL_LIMIT = 8
STUDY_TIMING_COLUMNS = ("step_s", "seconds")


@dataclass
class Trial:
    delay: float
    killed: bool  # False: the run had already finished when the kill came
    left_alive: int
    took_over: bool
    resumed_ok: bool
    detail: str


@dataclass
class Target:
    name: str
    criterion: str
    trials: list[Trial] = field(default_factory=list)
    wall: float = 0.0


@dataclass
class Command:
    """One command under test: its arguments for a trial folder, the rerun's, and the comparison with the
    reference folder (ok, a word or two for the log)."""

    key: str
    name: str
    criterion: str
    args: Callable[[Path], list[str]]
    same: Callable[[Path, Path], tuple[bool, str]]
    rerun: Callable[[list[str]], list[str]] = lambda args: args


def chaos_recipe(work: Path, source_limit: int = SOURCE_LIMIT) -> Path:
    """recipes/tiny-llava.yaml with absolute source paths and at most `source_limit` records per source."""
    raw = yaml.safe_load((REPO / "recipes" / "tiny-llava.yaml").read_text())
    os.environ["MLAN_SHARED_DATA"] = str(DATA)  # the recipe's ${MLAN_SHARED_DATA:-…} paths → DATA
    for src in raw["sources"]:
        for key in ("path", "images"):
            if src.get(key):
                src[key] = expand_env(src[key])
        src["limit"] = source_limit
    path = work / "chaos.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def continual_recipe(work: Path) -> Path:
    """recipes/continual-tiny.yaml with its first two tasks (its paths are {out}-relative)."""
    raw = yaml.safe_load((REPO / "recipes" / "continual-tiny.yaml").read_text())
    raw["tasks"] = raw["tasks"][:2]
    path = work / "continual.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def study_recipe(work: Path) -> Path:
    """recipes/study-smollm2.yaml with one item per eval task: `--quick` with the shortest evals."""
    src = REPO / "recipes" / "study-smollm2.yaml"
    raw = yaml.safe_load(src.read_text())
    os.environ["MLAN_SHARED_DATA"] = str(DATA)
    for section in (raw["sources"], raw["eval"]["tasks"]):
        for item in section:
            for key in ("path", "images"):
                value = item.get(key)
                if isinstance(value, str) and not value.startswith("data/"):
                    item[key] = str((src.parent / expand_env(value)).resolve())
    for task in raw["eval"]["tasks"]:
        task["limit"] = 1
    path = work / "study.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def tiny_pair(work: Path, recipe: Path) -> tuple[Path, Path]:
    """The chaos recipe's untrained tiny LLaVA (with tokenizer and processor: `mlan eval` loads it) and a base
    Llama holding its language tower plus noise (so that every task-vector entry is non-zero)."""
    import torch
    from transformers import LlamaForCausalLM

    from mlan.families.modeling import build_model
    from mlan.families.registry import get_family
    from mlan.families.tiny import tiny_llama_config
    from mlan.recipe import load_recipe
    from mlan.train.export import save_processor

    vlm_dir, llm_dir = work / "pair" / "vlm", work / "pair" / "llm"
    if (llm_dir / "config.json").is_file():
        return vlm_dir, llm_dir
    r = load_recipe(recipe)
    fc = get_family(r.model).family_config()
    torch.manual_seed(0)
    vlm = build_model(r.model, fc)
    vlm.save_pretrained(vlm_dir, safe_serialization=True, max_shard_size="2MB")
    save_processor(r, fc, vlm_dir)
    text = vlm.config.text_config
    base = LlamaForCausalLM(tiny_llama_config(text.num_hidden_layers, text.hidden_size, vocab_size=text.vocab_size))
    state = base.state_dict()
    gen = torch.Generator().manual_seed(1)
    for name, w in vlm.state_dict().items():
        for prefix, to in (("model.language_model.", "model."), ("language_model.model.", "model."),
                           ("lm_head.", "lm_head."), ("language_model.lm_head.", "lm_head.")):
            if name.startswith(prefix) and to + name[len(prefix):] in state:
                target = to + name[len(prefix):]
                if state[target].shape == w.shape:
                    state[target] = w.float() + torch.randn(w.shape, generator=gen) * 0.02
    base.load_state_dict(state)
    base.save_pretrained(llm_dir, safe_serialization=True, max_shard_size="2MB")
    return vlm_dir, llm_dir


def env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0",
                TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", MLAN_SHARED_DATA=str(DATA))


def mlan(args: list[str], log: Path) -> tuple[int, str, float]:
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.call([sys.executable, "-m", "mlan.cli", *args], env=env(), stdout=f,
                             stderr=subprocess.STDOUT)
    return rc, log.read_text(), time.perf_counter() - t0


def kill_at(args: list[str], delay: float, log: Path) -> tuple[bool, int, float]:
    """Start `mlan ARGS`, SIGKILL that process after `delay` s.

    Returns (killed, processes of it alive GRACE_S later, seconds it ran).
    """
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "mlan.cli", *args], env=env(), stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)
    seen: set[tuple[int, str]] = set()
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < delay and proc.poll() is None:
        seen |= descendants(proc.pid)
        time.sleep(0.05)
    killed = proc.poll() is None
    ran = time.perf_counter() - t0
    if killed:
        seen |= descendants(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(GRACE_S)
    left = alive(seen)
    for pid, _ in left:
        try:
            name = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")[:80].decode(errors="replace")
        except OSError:
            name = "?"
        print(f"  left alive: {pid} {name}", file=sys.stderr)  # clean up so that the next trial starts from a quiet machine
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return killed, len(left), ran


def kill_until_landed(args: list[str], fraction: float, wall: float, log: Path, fresh: list[Path]
                      ) -> tuple[float, bool, int, float]:
    """SIGKILL at `fraction` of the fastest wall time seen; a run that finished first lowers the wall time and,
    after its outputs (`fresh`) are removed, is started again (3 tries). Returns (delay, killed, left, wall)."""
    for _ in range(3):
        delay = max(0.5, fraction * wall)
        killed, left, ran = kill_at(args, delay, log)
        if killed:
            break
        wall = min(wall, ran)
        for path in fresh:
            shutil.rmtree(path, ignore_errors=True)
            path.mkdir(parents=True)
    return delay, killed, left, wall


def digests(folder: Path, names: list[str] | None = None) -> dict[str, str]:
    """sha256 of `names` in `folder` (default: every file under it), by path relative to it."""
    files = [folder / n for n in names] if names is not None else sorted(p for p in folder.rglob("*") if p.is_file())
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "missing"
            for p in files}


def build_files(out: Path) -> dict[str, str]:
    return digests(out, [str(p.relative_to(out)) for p in sorted((out / "shards").glob("*.tar"))] + ["manifest.json"])


def weights(run: Path) -> dict:
    return load_file(str(run / "final" / "model.safetensors"))


def max_diff(a: dict, b: dict) -> float:
    if set(a) != set(b):
        return float("inf")
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def same_files(names: list[str] | None = None, sub: str = "out") -> Callable[[Path, Path], tuple[bool, str]]:
    """A comparison: the files `names` of TRIAL/sub (default every file) byte-identical to REF/sub's."""
    def same(trial: Path, ref: Path) -> tuple[bool, str]:
        got, want = digests(trial / sub, names), digests(ref / sub, names)
        differ = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
        return (not differ, "byte-identical" if not differ else "differs: " + ", ".join(differ[:3]))
    return same


def same_weights(trial: Path, ref: Path) -> tuple[bool, str]:
    diff = max_diff(weights(trial / "run"), weights(ref / "run"))
    return diff <= 1e-6, f"max |Δw| {diff:.1e}"


def study_tables(out: Path) -> tuple[str, list[list[str]]]:
    """report.md up to its wall-time section, study.csv without its timing columns: what a rerun must repeat. The
    report names its own folder (the recipe as run): a placeholder, so that two folders can compare equal."""
    report = (out / "report.md").read_text().split("## 5. Wall time")[0].replace(str(out), "OUT")
    rows = list(csv.reader(io.StringIO((out / "study.csv").read_text())))
    keep = [i for i, k in enumerate(rows[0]) if k not in STUDY_TIMING_COLUMNS and not k.endswith("_s")]
    return report, [[r[i] for i in keep] for r in rows]


def same_merged(trial: Path, ref: Path) -> tuple[bool, str]:
    """Every file of the merged folder but merge.json (which records the merge's wall time)."""
    names = sorted(p.name for p in (ref / "out").iterdir() if p.name != "merge.json")
    return same_files(names)(trial, ref)


def same_study(trial: Path, ref: Path) -> tuple[bool, str]:
    got, want = study_tables(trial / "out"), study_tables(ref / "out")
    return got == want, "identical" if got == want else ("report differs" if got[0] != want[0] else "csv differs")


def commands(work: Path, recipe: Path, shards: Callable[[], Path], pair: Callable[[], tuple[Path, Path]]
             ) -> dict[str, Callable[[], Command]]:
    """Each command's setup (run lazily: train needs the reference build, merge and eval the tiny pair)."""
    def build() -> Command:
        return Command("build", "mlan build", "byte-identical",
                       lambda d: ["build", str(recipe), "--out", str(d / "out"), "--cache", str(d / "cache"),
                                  "--workers", "2", *BUILD_SETS],
                       _same_build)

    def train() -> Command:
        s = shards()
        return Command("train", "mlan train --nproc 2", "weights within 1e-6",
                       lambda d: ["train", str(recipe), "--shards", str(s), "--out", str(d / "run"), "--nproc", "2",
                                  *TRAIN_SETS],
                       same_weights, lambda a: [*a, "--resume"])

    def merge() -> Command:
        vlm, llm = pair()
        return Command("merge", "mlan merge", "byte-identical",
                       lambda d: ["merge", "--vlm", str(vlm), "--llm", str(llm), "--alpha", "0.5", "--density", "0.2",
                                  "--out", str(d / "out")],
                       same_merged)

    def evaluate() -> Command:
        vlm, _ = pair()
        tasks = [f"arc={DATA / 'eval' / 'arc-challenge_test.json'}", f"boolq={DATA / 'eval' / 'boolq_test.json'}",
                 f"nlvr={DATA / 'image_text' / 'nlvr_dev' / 'dev.json'}"]
        return Command("eval", "mlan eval", "byte-identical results + items",
                       lambda d: ["eval", str(vlm), "--tasks", *tasks, "--limit", str(EVAL_LIMIT),
                                  "--out", str(d / "out" / "results.json")],
                       same_files(["results.json", "results.items.jsonl"]))

    def continual() -> Command:
        ct = continual_recipe(work)
        sets = [x for s in CONTINUAL_SETS for x in ("--set", s)]
        return Command("continual", "mlan continual", "byte-identical matrix + forgetting",
                       lambda d: ["continual", str(ct), "--out", str(d / "out"), *sets],
                       same_files(["matrix.csv", "forgetting.json"]))

    def study() -> Command:
        st = study_recipe(work)
        return Command("study", "mlan study --quick", "identical report + csv",
                       lambda d: ["study", "--quick", "--recipe", str(st), "--out", str(d / "out")], same_study)

    return {"build": build, "train": train, "merge": merge, "eval": evaluate, "continual": continual,
            "study": study}


def _same_build(trial: Path, ref: Path) -> tuple[bool, str]:
    same = build_files(trial / "out") == build_files(ref / "out")
    return same, "byte-identical" if same else "differs"


def reference(cmd: Command, work: Path) -> tuple[Path, float]:
    ref = work / f"{cmd.key}-ref"
    ref.mkdir(parents=True, exist_ok=True)
    rc, out, wall = mlan(cmd.args(ref), work / f"{cmd.key}-ref.log")
    if rc != 0:
        raise SystemExit(f"reference {cmd.name} failed ({rc}):\n{out[-3000:]}")
    return ref, wall


def chaos(cmd: Command, work: Path, kills: int, rng: random.Random, ref: Path | None = None,
          wall: float | None = None) -> Target:
    """The reference run (unless given), then `kills` trials: kill, rerun, compare."""
    target = Target(cmd.name, cmd.criterion)
    t_all = time.perf_counter()
    if ref is None or wall is None:
        ref, wall = reference(cmd, work)
    for i in range(kills):
        d = work / f"{cmd.key}-{i}"
        d.mkdir(parents=True, exist_ok=True)
        args = cmd.args(d)
        delay, killed, left, wall = kill_until_landed(args, rng.uniform(0.05, 0.9), wall,
                                                      work / f"{cmd.key}-{i}-killed.log", [d])
        rc, log, _ = mlan(cmd.rerun(args), work / f"{cmd.key}-{i}-resume.log")
        ok, detail = cmd.same(d, ref) if rc == 0 else (False, f"rc {rc}: {log.strip().splitlines()[-1:]}")
        target.trials.append(Trial(delay, killed, left, "took over the lock" in log, ok, detail))
        print(f"{cmd.key} {i}: kill at {delay:.1f}s ({'killed' if killed else 'had finished'}), {left} left alive, "
              f"rerun: {detail}", file=sys.stderr, flush=True)
        if ok:
            shutil.rmtree(d, ignore_errors=True)  # a passing trial's folder is not needed (disk)
    target.wall = time.perf_counter() - t_all
    return target


HEADER = [("| command | kills landed | identical results | processes left alive 5 s after the kill "
           "| stale-lock takeovers | wall time |"), "|---|---|---|---|---|---|"]


def row(t: Target) -> str:
    landed = sum(tr.killed for tr in t.trials)
    ok = sum(tr.resumed_ok for tr in t.trials)
    return (f"| {t.name} | {landed}/{len(t.trials)} | {ok}/{len(t.trials)} {t.criterion} | "
            f"{sum(tr.left_alive for tr in t.trials)} | {sum(tr.took_over for tr in t.trials)} | {t.wall:.0f} s |")


def table(targets: list[Target], kills: int, seed: int) -> str:
    lines = [f"chaos: {kills} seeded SIGKILLs per command (seed {seed}), each followed by a rerun", "", *HEADER]
    return "\n".join(lines + [row(t) for t in targets])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kills", type=int, default=10, help="SIGKILLs per command (default 10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default=None, help="working folder (default: a temporary one, removed after)")
    p.add_argument("--commands", default=",".join(COMMANDS),
                   help=f"comma-separated, of {', '.join(COMMANDS)} (default: all)")
    p.add_argument("--source-limit", type=int, default=SOURCE_LIMIT,
                   help=f"records read per source (default {SOURCE_LIMIT}; fewer: shorter tokenizing)")
    args = p.parse_args(argv)
    chosen = [c.strip() for c in args.commands.split(",") if c.strip()]
    unknown = sorted(set(chosen) - set(COMMANDS))
    if unknown or not chosen:
        p.error(f"--commands: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(COMMANDS)}")
    if not (DATA / "README.md").is_file():
        print(f"chaos: the real data folder {DATA} is missing (set MLAN_SHARED_DATA)", file=sys.stderr)
        return 2
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="mlan-chaos-"))
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    recipe = chaos_recipe(work, args.source_limit)
    refs: dict[str, tuple[Path, float]] = {}

    def shards() -> Path:
        if "build" not in refs:
            refs["build"] = reference(setups["build"](), work)
        return refs["build"][0] / "out"

    setups = commands(work, recipe, shards, lambda: tiny_pair(work, recipe))
    targets: list[Target] = []
    print("\n".join(HEADER), flush=True)
    for key in [c for c in COMMANDS if c in chosen]:
        cmd = setups[key]()
        ref, wall = refs.get(key) or reference(cmd, work)
        targets.append(chaos(cmd, work, args.kills, rng, ref, wall))
        print(row(targets[-1]), flush=True)  # as each command ends: a long run shows its rows as it goes
    print()
    print(table(targets, args.kills, args.seed))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    bad = any(not tr.resumed_ok or tr.left_alive for t in targets for tr in t.trials)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
