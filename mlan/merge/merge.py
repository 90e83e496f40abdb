"""Training-free task-vector merging of a VLM's language tower with its base LLM (Ratzlaff et al.).

T = θ_vlm − θ_llm on the tensors the name map pairs; T̂ keeps the top-K entries of T by magnitude
(per tensor, or one threshold over all paired entries); M = θ_vlm − α·T̂ (`toward-llm`, the default,
which moves the tower back toward the LLM) or M = θ_vlm + α·T̂ (`paper`, as the summaries write it).

Everything streams: safetensors files are read with positioned reads, a chunk of one tensor at a
time, and written into output shards that mirror the VLM's (same header, same offsets), so peak
memory is a few chunks whatever the model size. The global threshold is the exact k-th largest |T|,
found by two radix-histogram passes over the float32 bit patterns of |T| (16 high bits, then 16 low
bits), never holding T. Ties at the threshold are kept in storage order (shard, then offset).
"""
from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import BinaryIO, Literal

import torch

from mlan import progress as mlan_progress
from mlan.atomic_write import atomic_open
from mlan.families.base import FamilyPlugin
from mlan.families.name_map import NameMap, NameMapError
from mlan.families.registry import FamilyLookupError, family_for_config, family_names
from mlan.merge.select import CutState, MagnitudeCut, find_cut, keep_count
from mlan.merge.tensors import (
    DTYPES,
    MergeError,
    ShardReader,
    TensorEntry,
    read_checkpoint,
    resolve_checkpoint,
)
from mlan.weights import read_safetensors_header

CHUNK_RANGE = (1 << 16, 1 << 20)  # elements processed at once: 1/32 of the largest tensor, within this range
_COPY_BYTES = 1 << 22
_MERGEABLE = {"F32", "F16", "BF16"}
PARTIAL = ".partial"  # a merged shard being written (never copied as a side file)
STAGING_SUFFIX = ".merging"  # the hidden folder beside --out a merge writes into (mlan.merge.merge.staging_dir)
MERGE_REPORT = "merge.json"

Scope = Literal["tensor", "global"]
Direction = Literal["toward-llm", "paper"]


@dataclass(frozen=True)
class MergeItem:
    """A paired tensor: its first `numel` flat elements merge (rows past the base vocabulary stay)."""

    vlm: TensorEntry
    llm: TensorEntry

    @property
    def numel(self) -> int:
        return self.llm.numel


def _pair(vlm: TensorEntry, llm: TensorEntry) -> MergeItem:
    """Check shapes and dtypes; only embedding/LM-head rows beyond the base vocabulary may differ."""
    for entry in (vlm, llm):
        if entry.dtype not in _MERGEABLE:
            raise MergeError(f"{entry.file.name}: tensor {entry.name!r} is {entry.dtype}; "
                             f"merging needs one of {sorted(_MERGEABLE)}")
    if vlm.shape != llm.shape:
        extra_rows = (len(vlm.shape) == 2 and vlm.shape[1:] == llm.shape[1:] and vlm.shape[0] > llm.shape[0]
                      and vlm.name.endswith(("embed_tokens.weight", "lm_head.weight")))
        if not extra_rows:
            raise MergeError(f"shape mismatch: VLM tensor {vlm.name!r} {list(vlm.shape)} vs base LLM tensor "
                             f"{llm.name!r} {list(llm.shape)}")
    return MergeItem(vlm, llm)


@dataclass(frozen=True)
class MergePlan:
    """Both checkpoints paired and checked: what the merge reads, decided before anything is written."""

    vlm: dict[str, TensorEntry]  # storage order
    items: dict[str, MergeItem]  # by VLM name
    names: NameMap

    @property
    def mapped_numel(self) -> int:
        return sum(item.numel for item in self.items.values())


def vlm_family(vlm_dir: Path) -> FamilyPlugin:
    """The VLM checkpoint's family (its config.json's `mlan_family`, else `model_type`): its name map pairs the
    language tower's tensors with the base LLM's."""
    path = vlm_dir / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise MergeError(f"{path}: the VLM's config cannot be read ({type(err).__name__}: {err})") from None
    if not isinstance(config, dict):
        raise MergeError(f"{path}: not a JSON object")
    try:
        plugin = family_for_config(config)
    except FamilyLookupError as err:
        raise MergeError(f"{path}: {err}") from None
    if plugin is None:
        raise MergeError(f"{path}: model_type {config.get('model_type')!r} is of no registered VLM family "
                         f"({', '.join(family_names())})")
    return plugin


def plan_merge(vlm_dir: Path, llm_dir: Path) -> MergePlan:
    """Pair the two checkpoints' tensors by name and check every pair, before anything is written."""
    vlm, llm = read_checkpoint(vlm_dir), read_checkpoint(llm_dir)
    plugin = vlm_family(vlm_dir)
    try:
        names = plugin.merge_name_map(list(vlm), list(llm))
    except NameMapError as err:
        raise MergeError(f"{vlm_dir} vs {llm_dir}: {err}") from None
    items = {v: _pair(vlm[v], llm[b]) for v, b in names.pairs.items()}
    return MergePlan(vlm=vlm, items=items, names=names)



@dataclass(frozen=True)
class MergeConfig:
    alpha: float
    density: float = 1.0
    scope: Scope = "tensor"
    direction: Direction = "toward-llm"
    chunk_elements: int | None = None  # None: 1/32 of the largest tensor, clamped to CHUNK_RANGE
    threads: int = 1  # torch intra-op threads while merging; chunk kernels are memory-bound (docs/merge.md)

    def __post_init__(self) -> None:
        if not 0.0 <= self.density <= 1.0:
            raise MergeError(f"--density must be a fraction in [0, 1], got {self.density}")
        if not math.isfinite(self.alpha):
            raise MergeError(f"--alpha must be finite, got {self.alpha}")
        if self.scope not in ("tensor", "global"):
            raise MergeError(f"--scope must be tensor or global, got {self.scope!r}")
        if self.direction not in ("toward-llm", "paper"):
            raise MergeError(f"--direction must be toward-llm or paper, got {self.direction!r}")
        if self.threads < 1:
            raise MergeError(f"threads must be ≥ 1, got {self.threads}")
        if self.chunk_elements is not None and self.chunk_elements < 1:
            raise MergeError(f"chunk_elements must be ≥ 1, got {self.chunk_elements}")


@dataclass
class MergeReport:
    """What a merge did; written next to the weights as merge.json."""

    vlm: str
    llm: str
    config: dict
    tensors: int = 0
    mapped_tensors: int = 0
    kept_vlm_tensors: int = 0
    mapped_entries: int = 0
    selected_entries: int = 0  # entries of T̂ (top-K), whatever α
    cross_attention_layers: list[int] = field(default_factory=list)
    layer_map: dict[str, int] = field(default_factory=dict)
    global_threshold: float | None = None
    seconds: float = 0.0


@dataclass(frozen=True)
class _Chunk:
    v: torch.Tensor  # VLM elements, own dtype
    v32: torch.Tensor  # the same as float32
    b32: torch.Tensor  # base LLM elements as float32
    bits: torch.Tensor  # |v32 − b32| as int32 bit patterns (monotone in the value)


class _Merger:
    """One merge run: reads the pair chunk by chunk, selects, writes the VLM-shaped output shards."""

    def __init__(self, plan: MergePlan, config: MergeConfig, reader: ShardReader, progress: bool) -> None:
        self.plan, self.config, self.reader = plan, config, reader
        self.weight = config.alpha if config.direction == "toward-llm" else -config.alpha
        self.progress = progress
        largest = max((e.numel for e in plan.vlm.values()), default=1)
        self.chunk = config.chunk_elements or min(max(largest // 32, CHUNK_RANGE[0]), CHUNK_RANGE[1])

    def chunks(self, item: MergeItem) -> Iterator[_Chunk]:
        """The pair's paired elements chunk by chunk, with |T| as float32 bits."""
        step = self.chunk
        for start in range(0, item.numel, step):
            stop = min(start + step, item.numel)
            v = self.reader.read(item.vlm, start, stop)
            v32, b32 = v.float(), self.reader.read(item.llm, start, stop).float()
            yield _Chunk(v, v32, b32, torch.sub(v32, b32).abs_().view(torch.int32))

    def bit_chunks(self, items: list[MergeItem]) -> Callable[[], Iterator[tuple[str, torch.Tensor]]]:
        def gen() -> Iterator[tuple[str, torch.Tensor]]:
            for item in items:
                for chunk in self.chunks(item):
                    yield item.vlm.name, chunk.bits
        return gen

    def global_cut(self) -> MagnitudeCut:
        items = list(self.plan.items.values())
        n = self.plan.mapped_numel
        return find_cut(self.bit_chunks(items), keep_count(self.config.density, n), n)

    def write_item(self, out: BinaryIO, item: MergeItem, state: CutState | None) -> int:
        """Write one merged tensor's bytes (its own cut when `state` is None); returns |T̂| entries kept."""
        chunks: Iterable[_Chunk] = self.chunks(item)
        if state is None:  # per-tensor scope
            k = keep_count(self.config.density, item.numel)
            if 0 < k < item.numel and item.numel <= self.chunk:  # one chunk: select in memory, read once
                chunks = list(chunks)
                state = CutState(find_cut(lambda: iter([(item.vlm.name, chunks[0].bits)]), k, item.numel))
            else:
                state = CutState(find_cut(self.bit_chunks([item]), k, item.numel))
        selected = 0
        dtype = DTYPES[item.vlm.dtype]
        for chunk in chunks:
            keep = state.mask(chunk.bits)
            selected += int(keep.sum())
            v = chunk.v
            if self.weight != 0:
                v = torch.where(keep, torch.lerp(chunk.v32, chunk.b32, self.weight).to(dtype), v)
            out.write(memoryview(v.contiguous().view(torch.uint8).numpy()))
        tail = item.vlm.nbytes - item.numel * item.vlm.itemsize  # rows past the base vocabulary
        self.copy(out, item.vlm.file, item.vlm.offset + item.vlm.nbytes - tail, tail)
        return selected

    def copy(self, out: BinaryIO, file: Path, offset: int, nbytes: int) -> None:
        out.writelines(self.reader.read_bytes(file, offset + start, min(_COPY_BYTES, nbytes - start))
                       for start in range(0, nbytes, _COPY_BYTES))

    def run(self, out_dir: Path, report: MergeReport) -> None:
        scope_cut = self.global_cut() if self.config.scope == "global" else None
        if scope_cut is not None:
            report.global_threshold = scope_cut.value
            global_state = CutState(scope_cut)
        by_file: dict[Path, list[TensorEntry]] = {}
        for entry in self.plan.vlm.values():
            by_file.setdefault(entry.file, []).append(entry)
        with mlan_progress.task("merge", total=len(self.plan.vlm), unit="tensors", enabled=self.progress) as bar:
            written = [0]

            def advance(nbytes: int) -> None:
                written[0] += nbytes
                bar.advance(1, MiB=round(written[0] / 2**20, 1))

            for file, entries in by_file.items():
                self.merge_file(out_dir, report, file, entries, global_state if scope_cut is not None else None,
                                advance)

    def merge_file(self, out_dir: Path, report: MergeReport, file: Path, entries: list[TensorEntry],
                   state: CutState | None, advance: Callable[[int], None]) -> None:
        """One VLM shard → its merged copy: header as is, each tensor merged or copied in file order."""
        raw, _ = read_safetensors_header(file)
        with atomic_open(out_dir / file.name, "wb", suffix=PARTIAL) as out:
            out.write(raw)  # same names, dtypes, shapes and offsets as the VLM's shard
            for entry in entries:
                if out.tell() != entry.offset:
                    raise MergeError(f"{file}: tensor {entry.name!r} does not follow the one before it")
                item = self.plan.items.get(entry.name)
                if item is None:
                    self.copy(out, file, entry.offset, entry.nbytes)
                else:
                    report.selected_entries += self.write_item(out, item, state)
                advance(entry.nbytes)


def _copy_side_files(vlm_dir: Path, out_dir: Path) -> None:
    """Config, generation config, tokenizer, processor, chat template, the index: all but weights."""
    for src in sorted(vlm_dir.iterdir()):
        if src.is_file() and not src.name.endswith((".safetensors", ".bin", ".pt", ".pth", PARTIAL)):
            shutil.copy2(src, out_dir / src.name)


def staging_dir(out_dir: Path) -> Path:
    """Where a merge writes until it is complete: a hidden sibling of `--out`, renamed into place at the end."""
    return out_dir.parent / f".{out_dir.name}{STAGING_SUFFIX}"


def _publish(staging: Path, out_dir: Path) -> None:
    """Move the finished merge into `out_dir`: one rename when the folder is absent or empty, else file by file
    with merge.json (the completion record) last."""
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        out_dir.rmdir()
    if not out_dir.exists():
        staging.rename(out_dir)
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    files = sorted(staging.iterdir(), key=lambda f: f.name == MERGE_REPORT)
    for f in files:
        f.replace(out_dir / f.name)
    staging.rmdir()


def _same_merge(out_dir: Path, vlm: str | Path, llm: str | Path, config: MergeConfig) -> bool:
    """Whether `out_dir` holds this very merge (its merge.json names the same inputs and settings): a rerun of
    a merge killed after it had finished redoes it in place instead of refusing the folder."""
    try:
        done = json.loads((out_dir / MERGE_REPORT).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(done, dict) and (done.get("vlm"), done.get("llm"), done.get("config")) == (
        str(vlm), str(llm), asdict(config))


def merge_checkpoints(vlm: str | Path, llm: str | Path, out: str | Path, config: MergeConfig,
                      progress: bool = False) -> MergeReport:
    """Merge a VLM's language tower with its base LLM into `out` (a from_pretrained-loadable folder).

    Everything is written into a hidden staging folder beside `out` and moved into place once complete, so a
    killed merge leaves `out` untouched and the next run starts over (removing the stale staging folder).
    """
    t0 = time.perf_counter()
    vlm_dir, llm_dir, out_dir = resolve_checkpoint(vlm), resolve_checkpoint(llm), Path(out)
    if out_dir.resolve() in (vlm_dir.resolve(), llm_dir.resolve()):
        raise MergeError(f"--out {out_dir} must differ from the input checkpoints")
    if out_dir.exists() and not out_dir.is_dir():
        raise MergeError(f"--out {out_dir} is a file; choose a folder")
    if out_dir.exists() and any(out_dir.glob("*.safetensors")) and not _same_merge(out_dir, vlm, llm, config):
        raise MergeError(f"--out {out_dir} already holds safetensors weights; choose an empty folder")
    plan = plan_merge(vlm_dir, llm_dir)
    report = MergeReport(
        vlm=str(vlm), llm=str(llm), config=asdict(config), tensors=len(plan.vlm),
        mapped_tensors=len(plan.items), kept_vlm_tensors=len(plan.vlm) - len(plan.items),
        mapped_entries=plan.mapped_numel, cross_attention_layers=list(plan.names.cross_attention_layers),
        layer_map={str(k): v for k, v in plan.names.layer_map.items()},
    )
    staging = staging_dir(out_dir)
    if staging.exists():  # left by a killed merge: never resumed from, always redone
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        with ShardReader() as reader:
            _Merger(plan, config, reader, progress).run(staging, report)
    finally:
        torch.set_num_threads(threads)
    _copy_side_files(vlm_dir, staging)
    report.seconds = round(time.perf_counter() - t0, 3)
    (staging / MERGE_REPORT).write_text(json.dumps(asdict(report), indent=2) + "\n")
    _publish(staging, out_dir)
    return report
