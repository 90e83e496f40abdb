"""`mlan demo` (`make demo`): the embedded default, a complete small ablation on this machine.

Generates the demo data (mlan/synthetic.py) into OUT/data, writes OUT/demo.yaml from recipes/demo.yaml,
then runs `mlan ablate` over DEMO_RATIOS with 2 FSDP processes and prints the table and the plot's path.
Re-running continues: finished ratios are not redone.
"""
from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from mlan.ablate import run_ablation
from mlan.errors import UserError
from mlan.synthetic import generate_demo_data

DEMO_RATIOS = (0.0, 0.5, 1.0)
DEMO_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "demo.yaml"


def prepare_demo(out: str | Path, recipe: str | Path = DEMO_RECIPE) -> Path:
    """Generate the data (once) and place the recipe beside it; returns OUT/demo.yaml."""
    out = Path(out)
    recipe = Path(recipe)
    if not recipe.is_file():
        raise UserError(f"{recipe}: the demo recipe is missing (mlan demo runs from a source checkout)")
    data = out / "data"
    if not (data / "eval_vision.jsonl").is_file():  # the last file written: its presence means complete
        generate_demo_data(data)
    target = out / "demo.yaml"
    shutil.copyfile(recipe, target)
    return target


def trend(rows: list[dict]) -> tuple[bool, bool]:
    """(language rises with the text share, vision rises with the image-text share), end to end."""
    rows = sorted(rows, key=lambda r: r["text_ratio"])
    lang = [r["language_avg"] for r in rows]
    vis = [r["vision_avg"] for r in rows]
    return lang[-1] > lang[0], vis[0] > vis[-1]


def run_demo(out: str | Path = "demo-out", ratios: Sequence[float] = DEMO_RATIOS, nproc: int = 2,
             overrides: Sequence[str] = ()) -> list[dict]:
    """Data → recipe → ablation; returns the ablation rows in ratio order."""
    recipe = prepare_demo(out)
    return run_ablation(recipe, ratios, Path(out) / "ablation", nproc=nproc, overrides=overrides)
