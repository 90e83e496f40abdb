"""Eval scoring (issue 11 item 7): numbers compare as numbers, image path patterns from the task or the command
line (the NLVR test split evaluates), image paths confined to their root, and `--limit` over a task's own limit."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from mlan.cli import main
from mlan.errors import UserError
from mlan.eval.answers import extract_answer, is_correct
from mlan.eval.harness import _as_task
from mlan.eval.tasks import load_task
from mlan.recipe import EvalTaskSpec


# ---------------------------------------------------------------- numbers
@pytest.mark.parametrize(("generation", "gold", "want"), [
    ("4", "4.0", True), ("4.0", "4", True), ("The answer is 4.00", "4", True), ("1000", "1,000", True),
    ("#### 1,000", "1000", True), ("-3.50", "-3.5", True), ("$12", "12", True), ("5", "4.0", False),
    ("40", "4.0", False), ("1000", "100", False), ("4.01", "4", False),
])
def test_numeric_answers_compare_as_numbers(generation: str, gold: str, want: bool) -> None:
    # reference: the values a person reads, compared as floats
    assert is_correct(extract_answer(generation, gold), gold) is want


def test_gsm8k_task_gold_with_decimals_matches_integer_generation() -> None:
    assert is_correct(extract_answer("so she pays 18 dollars. #### 18", "18.00", "gsm8k"), "18.00")
    assert not is_correct(extract_answer("#### 17", "18.00", "gsm8k"), "18.00")


# ---------------------------------------------------------------- image patterns
def _nlvr_split(shared_data: Path, dest: Path, split: str, n: int = 3, name: str = "{split}-{identifier}-0.png") -> list[dict]:
    """A few real NLVR dev records re-filed as another split: images renamed, the file named after the split."""
    src = shared_data / "image_text" / "nlvr_dev"
    records = [json.loads(line) for line in (src / "dev.json").read_text().splitlines()[:n]]
    for rec in records:
        target = dest / "images" / str(rec["directory"]) / name.format(split=split, **rec)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / "images" / str(rec["directory"]) / f"dev-{rec['identifier']}-0.png", target)
    (dest / f"{split}.json").write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def test_nlvr_test_split_finds_its_images_from_the_file_name(shared_data, tmp_path) -> None:
    records = _nlvr_split(shared_data, tmp_path, "test1")
    task = load_task(tmp_path / "test1.json")
    assert task.format == "nlvr" and task.group == "vision"
    want = [tmp_path / "images" / str(r["directory"]) / f"test1-{r['identifier']}-0.png" for r in records]
    assert [Path(it.image) for it in task.items] == want


def test_image_pattern_from_task_key_and_argument(shared_data, tmp_path) -> None:
    records = _nlvr_split(shared_data, tmp_path, "heldout", name="pic_{identifier}.png")
    with pytest.raises(UserError, match="image file not found"):
        load_task(tmp_path / "heldout.json")
    pattern = "images/{directory}/pic_{identifier}.png"
    want = [str(tmp_path / "images" / str(r["directory"]) / f"pic_{r['identifier']}.png") for r in records]
    assert [it.image for it in load_task(tmp_path / "heldout.json", image_pattern=pattern).items] == want
    spec = EvalTaskSpec(name="nlvr_heldout", path=str(tmp_path / "heldout.json"), image_pattern=pattern)
    assert [it.image for it in _as_task(spec, None, None).items] == want
    assert [it.image for it in _as_task(str(tmp_path / "heldout.json"), None, None, pattern).items] == want


def test_eval_command_takes_image_pattern(shared_data, tmp_path, tiny_llava_dir, capsys) -> None:
    _nlvr_split(shared_data, tmp_path, "heldout", n=2, name="pic_{identifier}.png")
    out = tmp_path / "res.json"
    rc = main(["eval", str(tiny_llava_dir), "--tasks", f"nlvr={tmp_path / 'heldout.json'}", "--out", str(out),
               "--image-pattern", "images/{directory}/pic_{identifier}.png"])
    assert rc == 0
    res = json.loads(out.read_text())["tasks"]["nlvr"]
    assert (res["n"], res["group"]) == (2, "vision")


# ---------------------------------------------------------------- containment
def _png(path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path)


@pytest.mark.parametrize("escape", ["dotdot", "absolute", "symlink"])
def test_eval_image_paths_stay_inside_their_root(tmp_path, escape: str, capsys) -> None:
    root = tmp_path / "task"
    secret = tmp_path / "outside" / "secret.png"
    _png(secret)
    _png(root / "ok.png")
    value = {"dotdot": "../outside/secret.png", "absolute": str(secret), "symlink": "link.png"}[escape]
    if escape == "symlink":
        os.symlink(secret, root / "link.png")
    f = root / "mc.jsonl"
    f.write_text(json.dumps({"question": "q", "choices": ["a", "b"], "answer": 0, "image": "ok.png"}) + "\n"
                 + json.dumps({"question": "q", "choices": ["a", "b"], "answer": 0, "image": value}) + "\n")
    with pytest.raises(UserError, match=r"record 1 .*(outside the image root|escapes the image root)"):
        load_task(f)
    assert load_task(f, limit=1).items[0].image == str(root / "ok.png")
    rc = main(["eval", str(tmp_path / "no-model"), "--tasks", str(f)])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "image root" in err


# ---------------------------------------------------------------- generation accuracy
# ---------------------------------------------------------------- --limit
def test_limit_flag_wins_over_the_task_limit(shared_data) -> None:
    spec = EvalTaskSpec(name="boolq", path=str(shared_data / "eval" / "boolq_test.json"), limit=5)
    assert len(_as_task(spec, None, None).items) == 5  # no --limit: the task's own
    assert len(_as_task(spec, 2, None).items) == 2  # --limit given: it wins, smaller
    assert len(_as_task(spec, 8, None).items) == 8  # … or larger
    assert len(_as_task({"path": spec.path, "name": "b", "limit": 5}, 3, None).items) == 3
