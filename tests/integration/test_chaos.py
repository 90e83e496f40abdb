"""Faults found by tools/chaos.py, each reproduced without a random kill, and (slow) one seeded SIGKILL of every
command through the tool itself."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM, LlavaForConditionalGeneration

from mlan.cli import main
from mlan.families.tiny import tiny_llama_config, tiny_llava_config

VOCAB = 1025


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.safetensors"))}


def _pair(root: Path) -> tuple[Path, Path]:
    """A 1-layer LLaVA and a Llama of the same language-tower shapes (random: T ≠ 0)."""
    torch.manual_seed(0)
    config = tiny_llava_config(num_layers=1, hidden=32)
    config.text_config.vocab_size, config.image_token_id = VOCAB, VOCAB - 1
    config.text_config.pad_token_id = VOCAB - 2
    LlavaForConditionalGeneration(config).save_pretrained(root / "vlm", max_shard_size="200KB")
    base = tiny_llama_config(1, 32, vocab_size=VOCAB)
    base.pad_token_id = VOCAB - 2
    LlamaForCausalLM(base).save_pretrained(root / "llm")
    return root / "vlm", root / "llm"


def test_a_merge_killed_after_it_finished_reruns_to_the_same_files(tmp_path, capsys):
    # chaos: a SIGKILL that lands after the merged folder is in place (while the interpreter exits) leaves a
    # complete --out; rerunning the same command must redo it to the same bytes, not refuse the folder
    vlm, llm = _pair(tmp_path)
    out = tmp_path / "merged"
    args = ["merge", "--vlm", str(vlm), "--llm", str(llm), "--alpha", "0.5", "--density", "0.2", "--out", str(out)]
    assert main(args) == 0
    first = _digests(out)
    assert len(first) >= 2
    assert main(args) == 0, capsys.readouterr().err
    assert _digests(out) == first
    # another merge into that folder is still refused, in one line
    assert main([*args[:-4], "--alpha", "0.25", "--density", "0.2", "--out", str(out)]) == 2
    errors = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
    assert len(errors) == 1 and "already holds" in errors[0], errors
    assert _digests(out) == first


@pytest.mark.slow
def test_a_killed_continual_run_leaves_no_child_running(tmp_path):
    # chaos: `mlan continual` ran its `mlan build` / `mlan train` steps as plain subprocesses, so a SIGKILL of
    # the sequence left the step running (and writing into the folder the rerun uses)
    import os
    import signal
    import subprocess
    import sys
    import time

    from mlan.child_process import alive, descendants

    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, "-m", "mlan.cli", "continual", str(repo / "recipes" / "continual-tiny.yaml"),
                             "--out", str(tmp_path / "out")], start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(repo)})
    deadline = time.time() + 120
    seen: set[tuple[int, str]] = set()
    while time.time() < deadline and proc.poll() is None:
        seen |= descendants(proc.pid)
        if any(b"mlan.cli\0build" in Path(f"/proc/{pid}/cmdline").read_bytes()
               for pid, _ in alive(seen) if Path(f"/proc/{pid}/cmdline").exists()):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the sequence ended before its first step"
    seen |= descendants(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 10
    while alive(seen) and time.time() < deadline:
        time.sleep(0.1)
    left = alive(seen)
    for pid, _ in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"{len(left)} processes outlived the killed `mlan continual`"


def test_the_study_comparison_ignores_the_folder_a_report_names(tmp_path):
    """tools/chaos.py compared study reports verbatim, but each names its own folder (the recipe as run): two
    identical studies in two folders never compared equal. Placeholder for the folder; real differences count."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("chaos_tool", Path(__file__).resolve().parents[2] / "tools" / "chaos.py")
    chaos = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = chaos  # its dataclasses look their module up there
    spec.loader.exec_module(chaos)
    for name, score in (("ref", "50.0"), ("trial", "50.0"), ("other", "75.0")):
        out = tmp_path / name / "out"
        out.mkdir(parents=True)
        (out / "report.md").write_text(f"Recipe as run: `{out}/study.yaml`\n| arc | {score} |\n## 5. Wall time\n{name}\n")
        (out / "study.csv").write_text(f"cell,arc,wall_s\nbase,{score},{len(name)}\n")
    assert chaos.same_study(tmp_path / "trial", tmp_path / "ref") == (True, "identical")
    assert chaos.same_study(tmp_path / "other", tmp_path / "ref") == (False, "report differs")
