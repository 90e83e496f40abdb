"""`mlan ablate` over the real data in ../shared/data with a tiny model: completes, writes csv/md/png, and
after a kill resumes without redoing finished ratios. Also the demo's code path at a tiny size, and the
table/plot writers on fixed rows."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mlan.ablate import markdown_table, parse_ratios, ratio_tag, write_outputs
from mlan.errors import UserError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _real_recipe(shared: Path, path: Path) -> Path:
    """Alpaca (text) + NLVR (image-text, templated), tiny LLaVA, a few hundred tokens per ratio."""
    path.write_text(f"""
model: {{family: llava, tokenizer: llama3, template: llama3, config: tiny, image_size: 56, image_tokens: 16}}
sources:
  - {{name: alpaca, path: {shared}/text/alpaca_en_demo.json, format: alpaca, modality: text, limit: 60}}
  - name: nlvr
    path: {shared}/image_text/nlvr_dev/dev.json
    format: template
    modality: image_text
    images: {shared}/image_text/nlvr_dev
    limit: 60
    template:
      prompts: ["<image>\\nIs this statement true or false? {{sentence}}"]
      response: "the direct answer is: {{label}}"
      image: "images/{{directory}}/dev-{{identifier}}-0.png"
mixture: {{budget: {{tokens: 1500}}, ratio: {{text: 0.5}}, seq_len: 256, seed: 42}}
shards: {{target_tokens: 800}}
train: {{lr: 0.001, batch_rows: 1, loader_workers: 0}}
eval:
  batch_size: 4
  limit: 3
  max_new_tokens: 4
  tasks:
    - {{name: arc, path: {shared}/eval/arc-easy_test.json}}
    - {{name: boolq, path: {shared}/eval/boolq_test.json}}
    - {{name: nlvr, path: {shared}/image_text/nlvr_dev/dev.json}}
""")
    return path


def _ablate(recipe: Path, out: Path, ratios: str) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, "-m", "mlan.cli", "ablate", str(recipe), "--ratios", ratios, "--out", str(out),
         "--nproc", "1", "--workers", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_real_data_ablation_resumes_after_kill(shared_data, tmp_path) -> None:
    recipe = _real_recipe(shared_data, tmp_path / "real.yaml")
    out = tmp_path / "abl"
    first, second = out / ratio_tag(0.25), out / ratio_tag(1.0)

    proc = _ablate(recipe, out, "0.25,1.0")
    deadline = time.time() + 400
    while not (second / "build").exists():  # the first ratio finished, the second has begun
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, "the first ratio did not finish in time"
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)  # the ablation and its build/train subprocesses
    proc.wait()
    assert (first / "result.json").is_file() and not (second / "result.json").exists()
    done = {p: p.stat().st_mtime_ns for p in (first / "result.json", first / "eval.json",
                                              first / "run" / "final" / "config.json", first / "build" / "manifest.json")}

    proc = _ablate(recipe, out, "0.25,1.0")
    log, _ = proc.communicate(timeout=500)
    assert proc.returncode == 0, log
    assert "text ratio 0.25: finished earlier" in log
    assert log.count("$ mlan build") == 1 and log.count("$ mlan train") == 1  # only the second ratio
    assert {p: p.stat().st_mtime_ns for p in done} == done  # nothing of the first ratio was redone

    rows = list(csv.DictReader((out / "ablation.csv").open()))
    assert [float(r["text_ratio"]) for r in rows] == [0.25, 1.0]
    for col in ("tokens_text", "tokens_image_text", "language_avg", "vision_avg", "arc", "boolq", "nlvr"):
        assert col in rows[0]
    assert int(rows[1]["tokens_image_text"]) == 0 and int(rows[1]["tokens_text"]) > 0
    assert int(rows[0]["tokens_image_text"]) > 0
    for r in rows:
        manifest = json.loads((out / ratio_tag(float(r["text_ratio"])) / "build" / "manifest.json").read_text())
        assert int(r["tokens_text"]) + int(r["tokens_image_text"]) == manifest["totals"]["tokens"]
        lang = [float(r[t]) for t in ("arc", "boolq")]
        assert float(r["language_avg"]) == pytest.approx(sum(lang) / 2)
        assert float(r["vision_avg"]) == pytest.approx(float(r["nlvr"]))
    md = (out / "ablation.md").read_text()
    assert md.splitlines()[0].startswith("| % language |") and "| 25 |" in md
    assert (out / "ablation.png").read_bytes()[:8] == PNG_MAGIC
    # both ratios shared one tokenized cache
    assert len([p for p in (out / "cache").iterdir() if p.is_dir()]) == 2


def _results(words: list[bool], colours: list[bool]) -> dict:
    """An in-process results dict (today's harness records: no ids; choice records with their log-likelihoods)."""
    def entry(group: str, correct: list[bool], options: int) -> dict:
        return {"accuracy": 100 * sum(correct) / len(correct), "n": len(correct), "group": group, "kind": "choice",
                "records": [{"correct": c, "loglikelihoods": [0.0] * options} for c in correct]}
    return {"tasks": {"words": entry("language", words, 4), "colours": entry("vision", colours, 2)},
            "language_avg": 100 * sum(words) / len(words), "vision_avg": 100 * sum(colours) / len(colours)}


def test_tables_on_fixed_rows(tmp_path) -> None:
    from mlan.eval.stats import score_stats, wilson_ci

    text_only = _results([True] * 16 + [False] * 4, [True] * 10 + [False] * 30)
    mixed = _results([True] * 14 + [False] * 6, [True] * 36 + [False] * 4)
    rows = [
        {"text_ratio": 1.0, "tokens_text": 1000, "tokens_image_text": 0, "tokens_total": 1000, "language_avg": 80.0,
         "vision_avg": 25.0, "groups": {"words": "language", "colours": "vision"}, "words": 80.0, "colours": 25.0,
         **score_stats(text_only)},
        {"text_ratio": 0.5, "tokens_text": 500, "tokens_image_text": 500, "tokens_total": 1000, "language_avg": 70.0,
         "vision_avg": 90.0, "groups": {"words": "language", "colours": "vision"}, "words": 70.0, "colours": 90.0,
         **score_stats(mixed)},
    ]
    write_outputs(rows, tmp_path)
    got = list(csv.DictReader((tmp_path / "ablation.csv").open()))
    assert [r["text_ratio"] for r in got] == ["0.5", "1.0"]  # sorted by ratio
    assert list(got[0])[:6] == ["text_ratio", "tokens_text", "tokens_image_text", "tokens_total", "language_avg",
                                "vision_avg"]
    assert got[0]["colours"] == "90.0" and got[0]["colours_n"] == "40" and got[0]["words_chance"] == "25.0"
    lo, hi = wilson_ci(36, 40)
    assert float(got[0]["colours_ci95_lo"]) == pytest.approx(lo) and float(got[0]["colours_ci95_hi"]) == pytest.approx(hi)
    assert float(got[0]["vision_avg_ci95_lo"]) < 90.0 < float(got[0]["vision_avg_ci95_hi"])
    md = markdown_table(sorted(rows, key=lambda r: r["text_ratio"])).splitlines()
    assert md[0] == ("| % language | text tokens | image-text tokens | colours (n=40) | vision avg | words (n=20) | "
                     "language avg |")
    assert md[2].startswith(f"| 50 | 500 | 500 | 90.0 ± {(hi - lo) / 2:.1f} | 90.0 ± ")
    assert "Chance level: colours 50.0 %, words 25.0 %" in md[-1]
    assert (tmp_path / "ablation.png").read_bytes()[:8] == PNG_MAGIC


def test_ratio_parsing() -> None:
    assert parse_ratios("0,0.25,1") == [0.0, 0.25, 1.0]
    for bad in ("0,2", "a,b", "0.5,0.5", ""):
        with pytest.raises(UserError):
            parse_ratios(bad)
    assert ratio_tag(0.25) == "ratio-0.25" and ratio_tag(0.0) == "ratio-0.0" and ratio_tag(0.125) == "ratio-0.125"


def test_export_complete_rejects_partial_exports(tmp_path) -> None:
    from transformers import LlamaForCausalLM

    from mlan.ablate import export_complete
    from mlan.families.tiny import tiny_llama_config

    final = tmp_path / "final"
    cfg = tiny_llama_config()
    cfg.vocab_size, cfg.pad_token_id = 512, 0  # small: this test is about files, not the model
    LlamaForCausalLM(cfg).save_pretrained(final)
    assert not export_complete(final)  # no tokenizer yet
    (final / "tokenizer.json").write_text("{}")
    assert export_complete(final)
    w = final / "model.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) - 100])  # killed while writing
    assert not export_complete(final)
    assert not export_complete(tmp_path / "missing")
