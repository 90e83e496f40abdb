"""`mlan ablate`'s parts: the table/plot writers on fixed rows, ratio parsing, what counts as a finished export.
An ablation end to end, SIGKILLed after its first ratio and rerun without redoing it, is the demo's run in
tests/integration/test_help.py::test_the_pipeline_examples_run (`mlan demo` is an ablation); `mlan ablate`'s own
example runs there too."""
from __future__ import annotations

import csv

import pytest

from mlan.ablate import markdown_table, parse_ratios, ratio_tag, write_outputs
from mlan.errors import UserError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


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
