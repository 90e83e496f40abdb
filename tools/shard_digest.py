"""Shard digests of the shipped recipes: build each one whose data is present, print every shard's sha256.

A refactoring that must not change behaviour (issue #13) is checked by running this on the old and the new
tree and diffing the output: the tars must be byte-identical. Small budgets keep it to a few minutes.

    MLAN_SHARED_DATA=../shared/data python tools/shard_digest.py [--work DIR] > digests.txt
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

import ray

from mlan.demo import prepare_demo
from mlan.errors import MlanError
from mlan.mixture.build import build
from mlan.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {  # recipe → overrides (small budgets; several shards where the recipe allows)
    "tiny-llava": ["mixture.budget.tokens=40000"],
    "tiny-mllama": ["mixture.budget.tokens=40000"],
    "shared-data": ["mixture.budget.tokens=40000", "shards.target_tokens=10000"],
    "demo": [],
}


def digests(name: str, work: Path) -> list[str]:
    """Build one recipe into WORK/NAME and return 'recipe shard sha256' lines (sha256 recomputed from the tar)."""
    path = prepare_demo(work / "demo-data") if name == "demo" else REPO / "recipes" / f"{name}.yaml"
    recipe = load_recipe(path, SETTINGS[name])
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    build(recipe, str(out / "out"), workers=2, cache_dir=str(out / "cache"), progress=False)
    manifest = json.loads((out / "out" / "manifest.json").read_text())
    lines = []
    for shard in manifest["shards"]:
        rel = shard.get("path", shard.get("name"))
        sha = hashlib.sha256((out / "out" / rel).read_bytes()).hexdigest()
        lines.append(f"{name} {rel} {sha}")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default=None, help="working folder (default: a temporary one, removed after)")
    args = p.parse_args()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="mlan-digest-"))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        for name in SETTINGS:
            try:
                lines = digests(name, work)
            except (MlanError, OSError) as err:  # the recipe's data is not here
                print(f"# {name}: skipped ({err})", file=sys.stderr)
                continue
            print("\n".join(lines), flush=True)
    finally:
        ray.shutdown()
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
