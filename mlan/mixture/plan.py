"""Budget × ratio × source weights → the seeded list of documents a build packs (numpy, no token loops).

Every document counts on the side of the ratio that it is (it has images or not), whatever its source:
a source holding both kinds (LLaVA-665K holds text-only conversations) is planned as two parts, each in
its modality's group, with the source's weight scaled by that part's share of the source. A source
smaller than its share is upsampled: whole repeats of every document plus a seeded sample
without replacement for the remainder. Targets carry the running error forward (source to source,
text to image-text), so the total lands within one document of the budget and the ratio within one
document of the target. Impossible plans fail with a message saying what is missing.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np

from mlan.recipe import RecipeError

MODALITIES = ("text", "image_text")
DEFAULT_MAX_UPSAMPLE = 1000.0  # mixture.max_upsample's default


class PlanError(RecipeError):
    """A mixture that cannot be built from these sources; the message says what is missing (exit status 2)."""


@dataclass(frozen=True)
class SourceDocs:
    """What the planner needs to know about one source's usable documents, in record order."""

    name: str
    modality: str  # "text" | "image_text"
    weight: float
    upsample: bool
    n_tokens: np.ndarray  # int64 (n_docs,) sequence tokens per document
    has_images: np.ndarray | None = None  # bool (n_docs,): the document's own modality; None: all `modality`

    def doc_modalities(self) -> np.ndarray:
        """Per document: True where it is an image-text document."""
        if self.has_images is None:
            return np.full(self.n_tokens.shape[0], self.modality == "image_text")
        return np.asarray(self.has_images, dtype=bool)


@dataclass(frozen=True)
class SourcePlan:
    """The plan of one source's documents of one modality (a mixed source has two)."""

    name: str
    modality: str  # the documents' modality (for a mixed source, not necessarily the declared one)
    available_docs: int
    available_tokens: int
    target: float  # tokens or examples, in the budget's unit, after error carry
    docs: int  # planned documents (with repeats)
    tokens: int
    repeats: int  # whole passes over the source
    sampled: int  # documents drawn for the remainder

    declared: str = ""  # the source's declared modality

    @property
    def key(self) -> str:
        """`name`, or `name [modality]` for the documents of a source that are not of its declared modality."""
        return self.name if self.modality == (self.declared or self.modality) else f"{self.name} [{self.modality}]"

    @property
    def factor(self) -> float:
        """Planned documents over available documents (1.0 = each once; > 1 upsampled)."""
        return self.docs / self.available_docs if self.available_docs else 0.0


@dataclass(frozen=True)
class Plan:
    """The ordered documents of a build: `source[i]` indexes `sources`, `doc[i]` the source's document."""

    source: np.ndarray  # int32 (n,)
    doc: np.ndarray  # int64 (n,)
    n_tokens: np.ndarray  # int64 (n,)
    sources: tuple[SourcePlan, ...] = field(default_factory=tuple)
    budget_unit: str = "tokens"
    budget: int = 0
    ratio_text: float = 0.75
    ratio_by: str = "tokens"

    def __len__(self) -> int:
        return int(self.source.shape[0])

    @property
    def tokens(self) -> int:
        return int(self.n_tokens.sum())


def check_modalities(modalities: list[str], ratio_text: float) -> None:
    """Fail before any work when the ratio asks for a modality no source provides."""
    if ratio_text < 1.0 and "image_text" not in modalities:
        raise PlanError(
            f"mixture.ratio.text = {ratio_text} leaves {1 - ratio_text:.4g} of the budget for image-text "
            "documents, but the recipe has no source with modality: image_text "
            "(add one, or set mixture.ratio.text=1.0)"
        )
    if ratio_text > 0.0 and "text" not in modalities:
        raise PlanError(
            f"mixture.ratio.text = {ratio_text} asks for text documents, but the recipe has no source with "
            "modality: text (add one, or set mixture.ratio.text=0.0)"
        )


def _rng(seed: int, name: str) -> np.random.Generator:
    """One stream per source, keyed by its name: adding a source does not reshuffle the others."""
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


# planned documents a build may hold (with repeats): 24 bytes each in the plan, more in packing; far beyond
# any real mixture (a 10^11-token build of 400-token documents), and refused before anything is allocated
MAX_PLANNED_DOCS = 1 << 28


def _select(src: SourceDocs, target: float, by: str, seed: int,
            max_upsample: float = DEFAULT_MAX_UPSAMPLE) -> tuple[np.ndarray, int, int]:
    """Documents of one source meeting `target` tokens or examples: repeats + a seeded remainder."""
    n = int(src.n_tokens.shape[0])
    total = int(src.n_tokens.sum())
    if target <= 0:
        return np.zeros(0, np.int64), 0, 0
    if n == 0 or total == 0:
        raise PlanError(f"source {src.name!r} has no usable documents but its share of the mixture is {target:.0f} {by}")
    available = total if by == "tokens" else n
    if target > available and not src.upsample:
        raise PlanError(
            f"source {src.name!r} has {available} {by} but its share of the budget is {target:.0f} {by}, "
            "and upsampling is off (set upsample: true on the source or mixture.upsample=true, "
            "lower mixture.budget, or add data)"
        )
    _check_supply(src.name, available, target, by, n, max_upsample)
    perm = _rng(seed, src.name).permutation(n)
    if by == "examples":
        want = round(target)
        repeats, k = divmod(want, n)
    else:
        repeats = int(target // total)
        rem = target - repeats * total
        cs = np.concatenate([[0], np.cumsum(src.n_tokens[perm])])
        k = int(np.searchsorted(cs, rem))
        if k > n:
            k = n
        elif k > 0 and (rem - cs[k - 1]) <= (cs[k] - rem):
            k -= 1  # the nearer of the two prefix sums around the remainder
    chosen = np.concatenate([np.tile(np.arange(n, dtype=np.int64), repeats), np.sort(perm[:k]).astype(np.int64)])
    return chosen, repeats, k


def _check_supply(name: str, available: int, target: float, by: str, n_docs: int, max_upsample: float) -> None:
    """Refuse a share that needs more upsampling than `max_upsample`, or more planned documents than
    MAX_PLANNED_DOCS, before any array of that size exists (a 1e13-token budget asked for hundreds of GiB)."""
    factor = target / available
    docs = factor * n_docs
    if factor > max_upsample or docs > MAX_PLANNED_DOCS:
        raise PlanError(
            f"source {name!r} has {available:,} {by} but its share of the budget is {target:,.0f} {by}: "
            f"{factor:,.0f}× upsampling ({docs:,.0f} planned documents), more than mixture.max_upsample = "
            f"{max_upsample:,g}" + (f" or the {MAX_PLANNED_DOCS:,} documents a plan may hold"
                                    if docs > MAX_PLANNED_DOCS else "")
            + " (lower mixture.budget, add data, or raise mixture.max_upsample)"
        )


def _modality_targets(
    groups: dict[str, list[SourceDocs]], budget_unit: str, budget: int, ratio_text: float, ratio_by: str
) -> tuple[str, dict[str, float]]:
    """Per-modality targets in the unit the sources are selected by."""
    if budget_unit == ratio_by:
        return budget_unit, {"text": budget * ratio_text, "image_text": budget * (1 - ratio_text)}

    def mean_tokens(mod: str) -> float:  # weight-averaged document length of a modality
        srcs = [s for s in groups.get(mod, []) if s.n_tokens.size]
        if not srcs:
            return 1.0
        w = np.array([s.weight for s in srcs])
        return float(np.dot(w / w.sum(), [s.n_tokens.mean() for s in srcs]))

    mt, mi = mean_tokens("text"), mean_tokens("image_text")
    r = ratio_text
    if budget_unit == "tokens":  # ratio by examples under a token budget: documents from mean lengths
        n = budget / (r * mt + (1 - r) * mi)
        n_text = round(r * n)
        return "examples", {"text": n_text, "image_text": round(n) - n_text}
    # ratio by tokens under an example budget
    n_text = round(budget * r * mi / (r * mi + (1 - r) * mt)) if 0 < r < 1 else round(budget * r)
    return "examples", {"text": n_text, "image_text": budget - n_text}


def make_plan(
    sources: list[SourceDocs],
    *,
    budget_tokens: int | None = None,
    budget_examples: int | None = None,
    ratio_text: float = 0.75,
    ratio_by: str = "tokens",
    seed: int = 42,
    max_upsample: float = DEFAULT_MAX_UPSAMPLE,
) -> Plan:
    """Select and order documents; deterministic in (sources, budget, ratio, weights, seed).

    A source whose share needs more than `max_upsample` passes over it is a PlanError, before allocation.
    """
    if (budget_tokens is None) == (budget_examples is None):
        raise PlanError("give exactly one of budget_tokens or budget_examples")
    budget_unit = "tokens" if budget_tokens is not None else "examples"
    budget = int(budget_tokens if budget_tokens is not None else budget_examples)
    check_modalities([s.modality for s in sources], ratio_text)
    parts = _split_by_modality(sources, budget_unit)
    groups: dict[str, list[_Part]] = {m: [p for p in parts if p.docs.modality == m] for m in MODALITIES}
    unit, targets = _modality_targets({m: [p.docs for p in g] for m, g in groups.items()}, budget_unit, budget,
                                      ratio_text, ratio_by)
    exact_ratio = budget_unit == ratio_by

    picks: dict[int, tuple[np.ndarray, SourcePlan]] = {}
    achieved_total = 0.0
    for mod in MODALITIES:
        mod_target = targets[mod]
        if mod == "image_text" and exact_ratio and ratio_text < 1.0:
            mod_target = budget - achieved_total  # carry the text side's rounding into image-text
        group = groups[mod]
        if mod_target <= 0 or not group:
            for p in group:
                picks[p.uid] = (np.zeros(0, np.int64), _summary(p, 0.0, np.zeros(0, np.int64), 0, 0))
            continue
        weights = np.array([p.docs.weight for p in group], dtype=np.float64)
        cum_targets = mod_target * np.cumsum(weights) / weights.sum()
        achieved = 0.0
        for p, cum in zip(group, cum_targets):
            target = cum - achieved  # this source's share plus the error so far
            chosen, repeats, k = _select(p.docs, target, unit, seed, max_upsample)
            got = float(p.docs.n_tokens[chosen].sum()) if unit == "tokens" else float(chosen.size)
            achieved += got
            picks[p.uid] = (chosen, _summary(p, target, chosen, repeats, k))
        achieved_total += achieved

    src_idx = np.concatenate([np.full(picks[p.uid][0].size, p.source, np.int32) for p in parts])
    doc_idx = np.concatenate([p.index[picks[p.uid][0]] for p in parts])
    lengths = np.concatenate([p.docs.n_tokens[picks[p.uid][0]] for p in parts]).astype(np.int64)
    order = np.random.default_rng([seed, 0x706C616E]).permutation(doc_idx.size)  # "plan": interleave sources
    return Plan(
        source=src_idx[order],
        doc=doc_idx[order],
        n_tokens=lengths[order],
        sources=tuple(picks[p.uid][1] for p in parts),
        budget_unit=budget_unit,
        budget=budget,
        ratio_text=ratio_text,
        ratio_by=ratio_by,
    )


@dataclass(frozen=True)
class _Part:
    """The documents of one source that share one modality, as the planner selects them."""

    uid: int
    source: int  # index into make_plan's `sources`
    declared: str  # the source's declared modality
    docs: SourceDocs  # this part's documents only (modality = theirs; weight scaled by the part's share)
    index: np.ndarray  # int64: this part's document k is the source's document index[k]


def _split_by_modality(sources: list[SourceDocs], budget_unit: str) -> list[_Part]:
    """Each source → one part per modality its documents have; a pure source is one part, unchanged."""
    parts: list[_Part] = []
    for i, s in enumerate(sources):
        is_image = s.doc_modalities()
        n = int(s.n_tokens.shape[0])
        if s.has_images is None or n == 0 or bool(is_image.all()) == bool(is_image.any()) and (
                bool(is_image.any()) == (s.modality == "image_text")):
            parts.append(_Part(len(parts), i, s.modality, s, np.arange(n, dtype=np.int64)))
            continue
        size = s.n_tokens.astype(np.float64) if budget_unit == "tokens" else np.ones(n)
        total = float(size.sum()) or 1.0
        for mod, mask in (("text", ~is_image), ("image_text", is_image)):
            if not mask.any():
                continue
            share = float(size[mask].sum()) / total
            name = s.name if mod == s.modality else f"{s.name} [{mod}]"  # its own seeded stream
            docs = SourceDocs(name=name, modality=mod, weight=s.weight * share, upsample=s.upsample,
                              n_tokens=s.n_tokens[mask])
            parts.append(_Part(len(parts), i, s.modality, docs, np.flatnonzero(mask).astype(np.int64)))
    return parts


def _summary(p: _Part, target: float, chosen: np.ndarray, repeats: int, k: int) -> SourcePlan:
    s = p.docs
    return SourcePlan(
        name=s.name.removesuffix(f" [{s.modality}]"),
        modality=s.modality,
        available_docs=int(s.n_tokens.size),
        available_tokens=int(s.n_tokens.sum()),
        target=float(target),
        docs=int(chosen.size),
        tokens=int(s.n_tokens[chosen].sum()),
        repeats=repeats,
        sampled=k,
        declared=p.declared,
    )
