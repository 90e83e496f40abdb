"""The generated tasks of recipes/continual-tiny.yaml: a language task and three vision-language tasks that a
tiny model learns in a few minutes on a CPU, and that interfere (two read colour, one reads position).

- language: the demo's word groups (mlan.synthetic): text.jsonl + eval_language.jsonl.
- colours: the demo's flat-colour pictures → colour name: image_text.json + eval_vision.jsonl.
- positions: a bright square on a dark picture → left | right | top | bottom.
- warmth: a flat warm (red, orange, yellow) or cool (blue, green, purple) picture → warm | cool.
Each VL task: a LLaVA-format JSON list + images, and an `mc` eval file (mlan.eval.tasks).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
from PIL import Image

from mlan.synthetic import colour_image, generate_demo_data

POSITIONS = ("left", "right", "top", "bottom")
WARM, COOL = ("red", "orange", "yellow"), ("blue", "green", "purple")
POSITION_PROMPT = "Where is the bright square in this picture?"
WARMTH_PROMPT = "Is the colour of this picture warm or cool?"
DONE = "continual-tiny.done"


def _save_png(arr: np.ndarray, path: Path) -> None:
    Image.fromarray(arr).save(path, format="PNG")


def square_image(position: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """A dark noisy picture with a bright square (a third of the side) centred on one edge's middle."""
    img = rng.normal(30, 8, size=(size, size, 3))
    s = size // 3
    mid = (size - s) // 2 + int(rng.integers(-3, 4))
    edge = int(rng.integers(1, 5))
    y, x = {"left": (mid, edge), "right": (mid, size - s - edge), "top": (edge, mid),
            "bottom": (size - s - edge, mid)}[position]
    img[y: y + s, x: x + s] = rng.uniform(200, 250)
    return np.clip(img, 0, 255).astype(np.uint8)


def _vl_task(root: Path, name: str, labels: list[str], draw, prompt: str, choices, n_train: int, n_eval: int,
             size: int, seed: int) -> None:
    rnd, rng = random.Random(seed), np.random.default_rng(seed)
    (root / "images" / name).mkdir(parents=True, exist_ok=True)
    train = []
    for i in range(n_train):
        label = labels[i % len(labels)]
        rel = f"{name}/{i:05d}.png"
        _save_png(draw(label, rng, size), root / "images" / rel)
        train.append({"id": f"{name}-{i:05d}", "image": rel,
                      "conversations": [{"from": "human", "value": "<image>\n" + prompt},
                                        {"from": "gpt", "value": choices(label)}]})
    (root / f"{name}.json").write_text(json.dumps(train, indent=0), encoding="utf-8")
    evals = []
    for i in range(n_eval):
        label = labels[(i * 7 + 3) % len(labels)]
        rel = f"images/{name}/eval-{i:05d}.png"
        _save_png(draw(label, rng, size), root / rel)
        options = sorted({choices(x) for x in labels})
        rnd.shuffle(options)
        evals.append({"question": prompt, "choices": options, "answer": choices(label), "image": rel})
    (root / f"eval_{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evals), encoding="utf-8")


def generate_continual_tiny(out: str | Path, *, n_train: int = 400, n_eval: int = 48, image_size: int = 56,
                            seed: int = 0) -> Path:
    """Write the four tasks' files under `out` once (a marker file says complete); returns `out`."""
    root = Path(out)
    if (root / DONE).is_file():
        return root
    generate_demo_data(root, n_image=n_train, n_eval_vision=n_eval, image_size=image_size, seed=seed)
    _vl_task(root, "positions", list(POSITIONS), square_image, POSITION_PROMPT, lambda x: x, n_train, n_eval,
             image_size, seed + 11)
    _vl_task(root, "warmth", [*WARM, *COOL], colour_image, WARMTH_PROMPT, lambda c: "warm" if c in WARM else "cool",
             n_train, n_eval, image_size, seed + 23)
    (root / DONE).write_text("ok\n")
    return root
