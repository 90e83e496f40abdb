"""Gather tools/gpu_check.sh's stage outputs into one JSON and one markdown table.

Reads DIR/env.json, DIR/stages.tsv (stage, exit status, seconds), DIR/tests.log (pytest's summary line),
DIR/bench-{plain,ac,compile}.json (tools/bench_train.py --json) and DIR/loader.json (tools/bench_loader.py --json);
a stage that failed or timed out is reported as such, never silently left out.

    python tools/gpu_report.py --env DIR  # prints the environment and writes DIR/env.json (the script's first stage)
    python tools/gpu_report.py DIR        # writes DIR/gpu_check.json and DIR/gpu_check.md, prints the markdown
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

BENCH_RUNS = (("plain", "FSDP2"), ("ac", "FSDP2 + activation checkpointing"), ("compile", "FSDP2 + torch.compile"))


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_stages(path: Path) -> dict[str, dict]:
    stages = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            name, rc, seconds = line.split("\t")
            stages[name] = {"rc": int(rc), "seconds": float(seconds), "timed_out": int(rc) in (124, 137)}
    return stages


def tests_summary(log: Path) -> str | None:
    """pytest's last summary line ("3 passed, 1 skipped in 4.2s"), or None."""
    if not log.is_file():
        return None
    lines = [ln.strip("= ") for ln in log.read_text().splitlines() if re.search(r"\d+ (passed|failed|error)", ln)]
    return lines[-1] if lines else None


def gather(folder: Path) -> dict:
    report = {"env": _read_json(folder / "env.json"), "stages": read_stages(folder / "stages.tsv"),
              "tests": tests_summary(folder / "tests.log"), "bench": {}, "loader": _read_json(folder / "loader.json")}
    for name, _ in BENCH_RUNS:
        result = _read_json(folder / f"bench-{name}.json")
        if result is not None:
            report["bench"][name] = result
    return report


def _status(report: dict, stage: str) -> str:
    s = report["stages"].get(stage)
    if s is None:
        return "not run"
    return "timed out" if s["timed_out"] else f"failed (exit {s['rc']})" if s["rc"] else "ok"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def markdown(report: dict) -> str:
    env = report["env"] or {}
    out = [(f"GPU check: {env.get('gpu', '?')} ({env.get('gpu_count', '?')} visible), torch {env.get('torch', '?')}, "
           f"CUDA {env.get('cuda', '?')}, transformers {env.get('transformers', '?')}"), ""]
    out.append(f"gpu tests: {_status(report, 'tests')}" + (f": {report['tests']}" if report["tests"] else ""))
    out += ["", "| run | arm | real tokens/s/GPU | MFU | peak memory | padding | speed-up (packed / padded) |",
            "|---|---|---:|---:|---:|---:|---:|"]
    for name, label in BENCH_RUNS:
        r = report["bench"].get(name)
        if r is None:
            out.append(f"| {label} | — | {_status(report, 'bench-' + name)} | | | | |")
            continue
        label = ("FSDP2" if r.get("fsdp") else "no FSDP") + (" + activation checkpointing"
                                                            if r.get("activation_checkpointing") else "") + \
            (" + torch.compile" if r.get("compile") else "") + f", {r['device']}"
        for arm, arm_label in (("packed", "packed rows"), ("padded", "pad-to-longest")):
            a = r[arm]
            speedup = f"**{r['speedup']:.2f}×**" if arm == "packed" else ""
            out.append(f"| {label} | {arm_label} | {a['tokens_per_s']:,.0f} | {_pct(a.get('mfu'))} | "
                       f"{a['peak_memory_gib']:.1f} GiB | {a['padding_fraction']:.1%} | {speedup} |")
    plain = report["bench"].get("plain")
    if plain:
        out += ["", (f"Model {plain['model']} ({plain['family']}), seq_len {plain['seq_len']}, {plain['attention']} "
                f"attention, {plain['packed']['batches']} timed batches per arm; MFU target for the 3B shape: ≥ 40%.")]
    loader = report["loader"]
    out += ["", f"loader ({_status(report, 'loader')})"]
    if loader:
        out += [(f"Mllama geometry: {loader['tile_size']}-px tiles, ≤ {loader['max_tiles']} tiles, seq_len "
                f"{loader['seq_len']}; demand {loader['demand_tokens_s']:,.0f} tokens/s per GPU "
                f"({'measured: the packed 3B arm' if loader['measured_demand'] else 'computed H100 baseline'})"), "",
                "| workers | tokens/s | images/s | × demand |", "|---:|---:|---:|---:|"]
        for w in loader["workers"]:
            out.append(f"| {w['workers']} | {w['tokens_s']:,.0f} | {w['images_s']:.1f} | "
                       f"{w['tokens_s'] / loader['demand_tokens_s']:.2f} |")
        out.append(f"\nworkers per GPU to meet the demand: {loader['workers_per_gpu']}")
    out += ["", "| stage | status | seconds |", "|---|---|---:|"]
    out += [f"| {name} | {_status(report, name)} | {s['seconds']:.0f} |" for name, s in report["stages"].items()]
    return "\n".join(out) + "\n"


def environment() -> dict:
    """Versions and devices the check ran on."""
    import platform

    import torch
    import transformers

    cuda = torch.cuda.is_available()
    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if cuda else None,
           "gpu_count": torch.cuda.device_count() if cuda else 0,
           "gpu": torch.cuda.get_device_name(0) if cuda else None,
           "gpu_memory_gib": torch.cuda.get_device_properties(0).total_memory / (1 << 30) if cuda else None,
           "capability": ".".join(map(str, torch.cuda.get_device_capability(0))) if cuda else None,
           "flash_sdp": torch.backends.cuda.flash_sdp_enabled() if cuda else None}
    return env


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder")
    ap.add_argument("--env", action="store_true", help="print the environment and write FOLDER/env.json only")
    args = ap.parse_args(argv)
    folder = Path(args.folder)
    if args.env:
        env = environment()
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "env.json").write_text(json.dumps(env, indent=1))
        print("\n".join(f"{k}: {v}" for k, v in env.items()))
        return 0
    report = gather(folder)
    text = markdown(report)
    (folder / "gpu_check.json").write_text(json.dumps(report, indent=1))
    (folder / "gpu_check.md").write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
