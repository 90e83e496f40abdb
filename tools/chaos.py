"""Kill `mlan build` and `mlan train --nproc 2` with SIGKILL at seeded random moments, resume, compare.

For each target: one uninterrupted reference run, then N trials. A trial starts the command in a session of
its own, SIGKILLs the `mlan` process alone (as `kill -9 PID` from a shell would) after a seeded random delay
(a fraction in [0.05, 0.9] of the fastest complete run seen so far; a run that finishes before its kill teaches
a faster wall time and the trial is tried again, up to 3 times, with the same fraction), counts the processes it had started that are still alive 5 s
later (then kills them so the next trial starts clean), and runs the command again (`--resume` for train).
The resumed build must be byte-identical to the reference (every shard and manifest.json); the resumed
training run's final weights must be within 1e-6 of the reference's. A resume that finds the killed run's
lock prints "took over the lock": those are counted as stale-lock takeovers.

    python tools/chaos.py [--kills 10] [--seed 0] [--work DIR]    (needs ../shared/data; ~1 min per kill)
"""
from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from safetensors.torch import load_file

from mlan.child_process import alive, descendants
from mlan.recipe import expand_env

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MLAN_SHARED_DATA", REPO.parent / "shared" / "data"))
GRACE_S = 5.0
BUILD_SETS = ["--set", "mixture.budget.tokens=20000", "--set", "shards.target_tokens=4000"]
TRAIN_SETS = ["--set", "train.budget_tokens=6000", "--set", "train.checkpoint_every_tokens=1500",
              "--set", "train.grad_accum=1", "--set", "train.loader_workers=1"]
SOURCE_LIMIT = 300  # records per source: tokenizing stays a few seconds, the kill still lands in every phase


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
    trials: list[Trial] = field(default_factory=list)
    wall: float = 0.0


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


def env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0",
                TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")


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
    return delay, killed, left, wall


def build_files(out: Path) -> dict[str, str]:
    files = sorted((out / "shards").glob("*.tar")) + [out / "manifest.json"]
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files if p.is_file()}


def weights(run: Path) -> dict:
    return load_file(str(run / "final" / "model.safetensors"))


def max_diff(a: dict, b: dict) -> float:
    if set(a) != set(b):
        return float("inf")
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def chaos_build(work: Path, recipe: Path, kills: int, rng: random.Random) -> tuple[Target, Path]:
    target = Target("mlan build")
    t_all = time.perf_counter()
    ref = work / "build-ref"
    rc, out, wall = mlan(["build", str(recipe), "--out", str(ref), "--cache", str(work / "cache-ref"),
                          "--workers", "2", *BUILD_SETS], work / "build-ref.log")
    if rc != 0:
        raise SystemExit(f"reference build failed ({rc}):\n{out[-3000:]}")
    want = build_files(ref)
    for i in range(kills):
        out_dir, cache = work / f"build-{i}", work / f"cache-{i}"
        args = ["build", str(recipe), "--out", str(out_dir), "--cache", str(cache), "--workers", "2",
                *BUILD_SETS]
        delay, killed, left, wall = kill_until_landed(args, rng.uniform(0.05, 0.9), wall,
                                                      work / f"build-{i}-killed.log", [out_dir, cache])
        rc, log, _ = mlan(args, work / f"build-{i}-resume.log")
        same = rc == 0 and build_files(out_dir) == want
        detail = "byte-identical" if same else f"rc {rc}" if rc else "differs"
        target.trials.append(Trial(delay, killed, left, "took over the lock" in log, same, detail))
        print(f"build {i}: kill at {delay:.1f}s ({'killed' if killed else 'had finished'}), {left} left alive, "
              f"resume: {detail}", file=sys.stderr)
        shutil.rmtree(cache, ignore_errors=True)
    target.wall = time.perf_counter() - t_all
    return target, ref


def chaos_train(work: Path, recipe: Path, shards: Path, kills: int, rng: random.Random) -> Target:
    target = Target("mlan train --nproc 2")
    t_all = time.perf_counter()
    sets = TRAIN_SETS
    ref = work / "run-ref"
    rc, out, wall = mlan(["train", str(recipe), "--shards", str(shards), "--out", str(ref), "--nproc", "2", *sets],
                         work / "run-ref.log")
    if rc != 0:
        raise SystemExit(f"reference training run failed ({rc}):\n{out[-3000:]}")
    want = weights(ref)
    for i in range(kills):
        run = work / f"run-{i}"
        args = ["train", str(recipe), "--shards", str(shards), "--out", str(run), "--nproc", "2", *sets]
        delay, killed, left, wall = kill_until_landed(args, rng.uniform(0.05, 0.9), wall,
                                                      work / f"run-{i}-killed.log", [run])
        rc, log, _ = mlan([*args, "--resume"], work / f"run-{i}-resume.log")
        diff = max_diff(weights(run), want) if rc == 0 else float("inf")
        ok = diff <= 1e-6
        detail = f"max |Δw| {diff:.1e}" if rc == 0 else f"rc {rc}"
        target.trials.append(Trial(delay, killed, left, "took over the lock" in log, ok, detail))
        print(f"train {i}: kill at {delay:.1f}s ({'killed' if killed else 'had finished'}), {left} left alive, "
              f"resume: {detail}", file=sys.stderr)
    target.wall = time.perf_counter() - t_all
    return target


def table(targets: list[Target], kills: int, seed: int) -> str:
    lines = [f"chaos: {kills} seeded SIGKILLs per target (seed {seed}), each followed by a resume",
             "",
             ("| target | kills landed | resumed identical | processes left alive 5 s after the kill "
              "| stale-lock takeovers | wall time |"),
             "|---|---|---|---|---|---|"]
    for t in targets:
        criterion = "byte-identical" if t.name == "mlan build" else "weights within 1e-6"
        landed = sum(tr.killed for tr in t.trials)
        ok = sum(tr.resumed_ok for tr in t.trials)
        lines.append(f"| {t.name} | {landed}/{len(t.trials)} | {ok}/{len(t.trials)} {criterion} | "
                     f"{sum(tr.left_alive for tr in t.trials)} | {sum(tr.took_over for tr in t.trials)} | "
                     f"{t.wall:.0f} s |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kills", type=int, default=10, help="SIGKILLs per target (default 10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default=None, help="working folder (default: a temporary one, removed after)")
    p.add_argument("--only", choices=["build", "train"], default=None)
    p.add_argument("--source-limit", type=int, default=SOURCE_LIMIT,
                   help=f"records read per source (default {SOURCE_LIMIT}; fewer: shorter tokenizing)")
    args = p.parse_args(argv)
    if not (DATA / "README.md").is_file():
        print(f"chaos: the real data folder {DATA} is missing (set MLAN_SHARED_DATA)", file=sys.stderr)
        return 2
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="mlan-chaos-"))
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    recipe = chaos_recipe(work, args.source_limit)
    targets: list[Target] = []
    ref_build = None
    if args.only in (None, "build"):
        target, ref_build = chaos_build(work, recipe, args.kills, rng)
        targets.append(target)
    if args.only in (None, "train"):
        if ref_build is None:
            ref_build = work / "build-ref"
            rc, out, _ = mlan(["build", str(recipe), "--out", str(ref_build), "--workers", "2",
                               "--cache", str(work / "cache-ref"), *BUILD_SETS],
                              work / "build-ref.log")
            if rc != 0:
                raise SystemExit(f"reference build failed ({rc}):\n{out[-3000:]}")
        targets.append(chaos_train(work, recipe, ref_build, args.kills, rng))
    print(table(targets, args.kills, args.seed))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    bad = any(not tr.resumed_ok or tr.left_alive for t in targets for tr in t.trials)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
