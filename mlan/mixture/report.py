"""stats.json and report.md: what a build achieved against what the recipe asked, for machines and people."""
from __future__ import annotations

import re
from collections import Counter

import numpy as np

_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
_PATH = re.compile(r"(?:[A-Za-z][\w+.-]*://|/)\S+")
_NUMBER = re.compile(r"\b\d+\b")


def reason_kind(reason: str) -> str:
    """A rejection reason without its specifics (paths, quoted values, numbers), so equal causes count together."""
    text = _QUOTED.sub("<value>", reason)
    text = _PATH.sub("<path>", text)
    return _NUMBER.sub("N", text)


def compute_stats(
    *,
    seq_len: int,
    plan,
    planned: dict[str, np.ndarray],
    packing,
    source_summaries: dict[str, dict],
    rejected: list[dict],
    dropped: list[dict],
    n_shards: int,
    fingerprint: str,
) -> dict:
    """The build's figures from the plan, the per-planned-document counts and the packing.

    `planned` holds per planned document (plan order): n_tokens, n_loss_tokens, n_images, n_tiles,
    n_vision_tokens, truncated, modality ("text"/"image_text" as str array), source (name array).
    """
    names = list(dict.fromkeys(s.name for s in plan.sources))
    reasons = Counter(reason_kind(r["reason"]) for r in rejected)
    return {
        "version": 1,
        "fingerprint": fingerprint,
        "seq_len": seq_len,
        **_budget_figures(plan, planned, names),
        "packing_efficiency": packing.efficiency,
        "rows": packing.n_rows,
        "shards": n_shards,
        "truncated": int(planned["truncated"].sum()),
        "truncated_records": sum(s["truncated"] for s in source_summaries.values()),
        "dropped": len(dropped),
        "rejected": dict(sorted(reasons.items())),
        "records": source_summaries,
        **_source_figures(plan, planned, names),
        **_image_figures(planned),
    }


def _budget_figures(plan, planned: dict[str, np.ndarray], names: list[str]) -> dict:
    """The budget reached, tokens and examples by modality and source, the text ratio achieved."""
    mod, src, tok = planned["modality"], planned["source"], planned["n_tokens"]
    is_text = mod == "text"
    text_tokens, image_tokens = int(tok[is_text].sum()), int(tok[~is_text].sum())
    total_tokens = text_tokens + image_tokens
    n_text, n_image = int(is_text.sum()), int((~is_text).sum())
    if plan.ratio_by == "tokens":
        ratio = text_tokens / total_tokens if total_tokens else 0.0
    else:
        ratio = n_text / (n_text + n_image) if (n_text + n_image) else 0.0
    return {
        "budget": {
            "unit": plan.budget_unit,
            "target": plan.budget,
            "achieved": total_tokens if plan.budget_unit == "tokens" else n_text + n_image,
        },
        "tokens": {
            "total": total_tokens,
            "loss": int(planned["n_loss_tokens"].sum()),
            "by_modality": {"text": text_tokens, "image_text": image_tokens},
            "by_source": {n: int(tok[src == n].sum()) for n in names},
        },
        "examples": {
            "total": n_text + n_image,
            "by_modality": {"text": n_text, "image_text": n_image},
            "by_source": {n: int((src == n).sum()) for n in names},
        },
        "ratio_by": plan.ratio_by,
        "ratio_target": plan.ratio_text,
        "ratio_achieved": ratio,
    }


def _source_figures(plan, planned: dict[str, np.ndarray], names: list[str]) -> dict:
    """Per source: tokens and documents by modality, upsampling, and what the plan asked of it."""
    mod, src, tok = planned["modality"], planned["source"], planned["n_tokens"]
    return {
        "by_source_modality": {
            n: {m: {"tokens": int(tok[(src == n) & (mod == m)].sum()), "documents": int(((src == n) & (mod == m)).sum())}
                for m in ("text", "image_text")}
            for n in names
        },
        "upsampled": {
            s.key: {"factor": round(s.factor, 6), "repeats": s.repeats, "sampled": s.sampled, "available": s.available_docs}
            for s in plan.sources
            if s.docs > s.available_docs
        },
        "sources": {
            s.key: {
                "modality": s.modality, "available_docs": s.available_docs, "available_tokens": s.available_tokens,
                "target": round(s.target, 3), "docs": s.docs, "tokens": s.tokens,
            }
            for s in plan.sources
        },
    }


def _image_figures(planned: dict[str, np.ndarray]) -> dict:
    """Images, vision tokens, and how many images got each tile count."""
    tiles = Counter(int(t) for per_image in planned["image_tiles"] for t in per_image)
    return {
        "images": int(planned["n_images"].sum()),
        "vision_tokens": int(planned["n_vision_tokens"].sum()),
        "tiles": {str(k): v for k, v in sorted(tiles.items())},
    }


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def render_report(stats: dict, recipe_name: str = "") -> str:
    """report.md: target vs achieved, tokens per source and modality, packing, losses of records, images."""
    t, e = stats["tokens"], stats["examples"]
    b = stats["budget"]
    unit = b["unit"]
    lines = [f"# mlan build report{(' — ' + recipe_name) if recipe_name else ''}", ""]
    lines += [
        (f"Fingerprint `{stats['fingerprint']}` · seq_len {stats['seq_len']} · {stats['rows']} rows in "
         f"{stats['shards']} shards"),
        "",
        "## Target vs achieved",
        "",
        "| | target | achieved |",
        "|---|---:|---:|",
        f"| budget ({unit}) | {b['target']:,} | {b['achieved']:,} |",
        f"| text ratio (by {stats['ratio_by']}) | {stats['ratio_target']:.4f} | {stats['ratio_achieved']:.4f} |",
        f"| packing efficiency | — | {_pct(stats['packing_efficiency'])} |",
        *([(f"| rows (bound: max(⌈tokens/seq_len⌉, ⌈images/max_images_per_row⌉)) | {stats['row_bound']:,} | "
           f"{stats['rows']:,} |")] if "row_bound" in stats else []),
        "",
        "## Tokens and documents by modality",
        "",
        "| modality | tokens | share | documents |",
        "|---|---:|---:|---:|",
    ]
    for m in ("text", "image_text"):
        share = t["by_modality"][m] / t["total"] if t["total"] else 0.0
        lines.append(f"| {m} | {t['by_modality'][m]:,} | {_pct(share)} | {e['by_modality'][m]:,} |")
    lines.append(f"| **total** | {t['total']:,} | | {e['total']:,} |")
    lines += [
        "",
        f"Loss (trained) tokens: {t['loss']:,} ({_pct(t['loss'] / t['total']) if t['total'] else '—'} of sequence tokens).",
        "",
        "## Sources",
        "",
        "| source | modality | available docs | planned docs | tokens | share of modality | upsampling |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for name, s in stats["sources"].items():
        mod_total = t["by_modality"][s["modality"]]
        up = stats["upsampled"].get(name)
        up_txt = f"×{up['factor']:.3f} ({up['repeats']} repeats + {up['sampled']} sampled)" if up else "—"
        share = _pct(s["tokens"] / mod_total) if mod_total else "—"
        lines.append(
            f"| {name} | {s['modality']} | {s['available_docs']:,} | {s['docs']:,} | {s['tokens']:,} | {share} | {up_txt} |"
        )
    lines += ["", ("Documents count on the side of the ratio that they are (images or not), whatever their source's "
                   "declared modality; `name [modality]` rows are a source's documents of the other modality."), "",
              "### Tokens and documents by source × modality", "",
              "| source | text tokens | text documents | image-text tokens | image-text documents |",
              "|---|---:|---:|---:|---:|"]
    for name, by in stats.get("by_source_modality", {}).items():
        lines.append(f"| {name} | {by['text']['tokens']:,} | {by['text']['documents']:,} | "
                     f"{by['image_text']['tokens']:,} | {by['image_text']['documents']:,} |")
    lines += ["", "## Records", "", "| source | read | accepted | rejected | dropped (overlong) | truncated |",
              "|---|---:|---:|---:|---:|---:|"]
    for name, r in stats["records"].items():
        lines.append(f"| {name} | {r['read']:,} | {r['accepted']:,} | {r['rejected']:,} | {r['dropped']:,} | {r['truncated']:,} |")
    lines += ["", f"Truncated documents in the plan: {stats['truncated']:,}. Dropped records: {stats['dropped']:,}.", ""]
    notes = [(name, note, n) for name, r in stats["records"].items() for note, n in r.get("notes", {}).items()]
    if notes:  # what conversion changed in accepted records, e.g. an end marker cut from a completion
        lines += ["Conversion notes (records accepted with a change):", "", "| source | note | records |", "|---|---|---:|"]
        lines += [f"| {name} | {note} | {n:,} |" for name, note, n in notes] + [""]
    if stats["rejected"]:
        lines += ["Rejected records by reason (each listed in `rejected.jsonl`):", "", "| reason | count |", "|---|---:|"]
        lines += [f"| {reason} | {n:,} |" for reason, n in stats["rejected"].items()]
    else:
        lines.append("No record was rejected.")
    lines += [
        "",
        "## Images",
        "",
        f"Images: {stats['images']:,} · vision (encoder-side) tokens: {stats['vision_tokens']:,} (reported, never budgeted).",
        "",
    ]
    if stats["tiles"]:
        lines += ["| tiles per image | images |", "|---:|---:|"]
        lines += [f"| {k} | {v:,} |" for k, v in stats["tiles"].items()]
    return "\n".join(lines) + "\n"

