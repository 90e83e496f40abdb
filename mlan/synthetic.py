"""Generated demo data: a text skill and a vision skill that a tiny model learns in minutes on a CPU.

- Language (text-only instructions): "which group does this word belong to: W?" → animal | fruit | tool |
  place, over a fixed vocabulary of words. Knowledge that only text documents teach.
- Vision (image-text instructions): a flat-coloured picture with a little noise → its colour name. A skill
  that only image documents teach.
Both are scored by log-likelihood choice among four options (chance = 25%), so a model that never saw a
skill's documents scores near chance on it: the mixture ratio trades one skill against the other.
Files: text.jsonl (alpaca), image_text.json (LLaVA conversations) + images/*.png, and eval files in the
`mc` form of mlan.eval.tasks (question, choices, answer[, image]).
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

CATEGORIES: dict[str, tuple[str, ...]] = {
    "animal": ("dog", "cat", "horse", "cow", "sheep", "mouse", "lion", "tiger", "bear", "wolf",
               "fox", "rabbit", "goat", "duck", "eagle", "shark", "whale", "snake", "frog", "monkey"),
    "fruit": ("apple", "banana", "grape", "lemon", "cherry", "peach", "pear", "mango", "melon", "plum",
              "lime", "kiwi", "berry", "fig", "coconut", "apricot", "papaya", "date", "olive", "guava"),
    "tool": ("hammer", "saw", "drill", "wrench", "knife", "axe", "shovel", "rake", "chisel", "file",
             "brush", "ladder", "needle", "scissors", "spoon", "fork", "pen", "pencil", "ruler", "rope"),
    "place": ("city", "village", "forest", "desert", "beach", "island", "mountain", "river", "lake", "valley",
              "market", "school", "church", "castle", "farm", "harbor", "airport", "bridge", "garden", "prison"),
}
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 220), "yellow": (240, 220, 30),
    "purple": (140, 40, 170), "orange": (250, 140, 20), "black": (20, 20, 20), "white": (235, 235, 235),
}
# the word is always the prompt's last word: its distance to the answer is fixed, which a tiny model learns fast
TEXT_PROMPTS = ("Which group does this word belong to: {w}?", "What kind of thing is a {w}?",
                "Classify the word {w}.", "Tell me the category of {w}.")
IMAGE_PROMPTS = ("What colour is this picture?", "Which colour fills the image?", "Name the colour of this image.")
EVAL_TEXT_PROMPT = TEXT_PROMPTS[0]
EVAL_IMAGE_PROMPT = IMAGE_PROMPTS[0]


@dataclass(frozen=True)
class DemoData:
    """Where the generated files are."""

    root: Path
    text: Path  # alpaca JSON lines
    image_text: Path  # LLaVA-format JSON list; image paths relative to `images_root`
    images_root: Path
    eval_language: Path  # mc JSONL
    eval_vision: Path  # mc JSONL with images (paths relative to the eval file's folder)


def word_facts(words_per_category: int = 12) -> list[tuple[str, str]]:
    """(word, category) pairs, the knowledge the text documents teach."""
    return [(w, c) for c, words in CATEGORIES.items() for w in words[:words_per_category]]


def colour_image(colour: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """A flat colour with a random brightness shift and pixel noise (uint8 HxWx3)."""
    base = np.array(COLOURS[colour], dtype=np.float32) + rng.uniform(-25, 25)
    pixels = base + rng.normal(0, 8, size=(size, size, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8)


def _save_png(arr: np.ndarray, path: Path) -> None:
    Image.fromarray(arr).save(path, format="PNG", optimize=False)


def _jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def generate_demo_data(out: str | Path, *, n_text: int = 600, n_image: int = 240, n_eval_vision: int = 80,
                       words_per_category: int = 12, image_size: int = 56, seed: int = 0) -> DemoData:
    """Write the demo's training and evaluation files under `out` (deterministic for a seed)."""
    root = Path(out)
    images = root / "images"
    (images / "train").mkdir(parents=True, exist_ok=True)
    (images / "eval").mkdir(parents=True, exist_ok=True)
    rnd = random.Random(seed)
    rng = np.random.default_rng(seed)
    facts = word_facts(words_per_category)

    text = []
    for _ in range(n_text):
        word, cat = rnd.choice(facts)
        text.append({"instruction": rnd.choice(TEXT_PROMPTS).format(w=word), "output": cat})
    _jsonl(root / "text.jsonl", text)

    colours = list(COLOURS)
    conversations = []
    for i in range(n_image):
        colour = colours[i % len(colours)] if i < len(colours) else rnd.choice(colours)
        name = f"train/{i:05d}.png"
        _save_png(colour_image(colour, rng, image_size), images / name)
        conversations.append({
            "id": f"colour-{i:05d}",
            "image": name,
            "conversations": [{"from": "human", "value": "<image>\n" + rnd.choice(IMAGE_PROMPTS)},
                              {"from": "gpt", "value": colour}],
        })
    (root / "image_text.json").write_text(json.dumps(conversations, indent=0), encoding="utf-8")

    cats = list(CATEGORIES)
    lang_eval = [{"question": EVAL_TEXT_PROMPT.format(w=w), "choices": cats, "answer": c} for w, c in facts]
    _jsonl(root / "eval_language.jsonl", lang_eval)

    vis_eval = []
    erng = np.random.default_rng(seed + 1)
    for i in range(n_eval_vision):
        colour = colours[i % len(colours)]
        name = f"images/eval/{i:05d}.png"
        _save_png(colour_image(colour, erng, image_size), root / name)
        options = [colour] + rnd.sample([c for c in colours if c != colour], 3)
        rnd.shuffle(options)
        vis_eval.append({"question": EVAL_IMAGE_PROMPT, "choices": options, "answer": colour, "image": name})
    _jsonl(root / "eval_vision.jsonl", vis_eval)
    return DemoData(root=root, text=root / "text.jsonl", image_text=root / "image_text.json", images_root=images,
                    eval_language=root / "eval_language.jsonl", eval_vision=root / "eval_vision.jsonl")
