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
import os
import shutil
import struct
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from mlan.errors import MlanError
from mlan.families.name_map import NameMap, NameMapError, map_names
from mlan.weights import read_safetensors_header, safetensors_files

INDEX_FILE = "model.safetensors.index.json"
CHUNK_RANGE = (1 << 16, 1 << 20)  # elements processed at once: 1/32 of the largest tensor, within this range
_COPY_BYTES = 1 << 22
_HI_BINS = 1 << 15  # |T| is non-negative: float32 bits >> 16 < 2**15
_LO_BINS = 1 << 16
_FLOAT32_INF_BITS = 0x7F800000

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_MERGEABLE = {"F32", "F16", "BF16"}

Scope = Literal["tensor", "global"]
Direction = Literal["toward-llm", "paper"]


class MergeError(MlanError, ValueError):
    """The merge cannot proceed; the message names the checkpoint, tensor or argument at fault."""


# ---------------------------------------------------------------- reading safetensors lazily
@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes are: file, absolute byte offset, dtype and shape (from the header)."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute, from the start of the file
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=_DTYPES[self.dtype]).element_size()


def read_header(file: Path) -> tuple[bytes, dict]:
    """The raw header bytes (length prefix included) and the parsed JSON header, bounded and type-checked."""
    return read_safetensors_header(file)


def _weight_files(directory: Path) -> list[Path]:
    return safetensors_files(directory)


def read_checkpoint(directory: Path) -> dict[str, TensorEntry]:
    """Every tensor of a safetensors checkpoint (one file or an indexed set of shards), in storage order."""
    entries: dict[str, TensorEntry] = {}
    for file in _weight_files(directory):
        if not file.is_file():
            raise MergeError(f"{directory / INDEX_FILE}: names shard {file.name}, which is missing")
        raw, header = read_header(file)
        for name, info in sorted(((k, v) for k, v in header.items() if k != "__metadata__"),
                                 key=lambda kv: kv[1]["data_offsets"][0]):
            if name in entries:
                raise MergeError(f"{directory}: tensor {name!r} appears in both {entries[name].file.name} "
                                 f"and {file.name}")
            if info["dtype"] not in _DTYPES:
                raise MergeError(f"{file}: tensor {name!r} has unsupported dtype {info['dtype']}")
            begin, end = info["data_offsets"]
            entries[name] = TensorEntry(name, file, info["dtype"], tuple(info["shape"]), len(raw) + begin,
                                        end - begin)
    return entries


class ShardReader:
    """Positioned reads of tensor chunks; keeps one descriptor per file, maps nothing into memory."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}

    def _fd(self, file: Path) -> int:
        if file not in self._fds:
            self._fds[file] = os.open(file, os.O_RDONLY)
        return self._fds[file]

    def read_bytes(self, file: Path, offset: int, nbytes: int) -> bytearray:
        buf = bytearray(nbytes)
        view, done, fd = memoryview(buf), 0, self._fd(file)
        while done < nbytes:
            got = os.preadv(fd, [view[done:]], offset + done)
            if got == 0:
                raise MergeError(f"{file}: truncated (wanted {nbytes} bytes at offset {offset})")
            done += got
        return buf

    def read(self, entry: TensorEntry, start: int, stop: int) -> torch.Tensor:
        """Flat elements [start, stop) of a tensor, in its own dtype."""
        size = entry.itemsize
        buf = self.read_bytes(entry.file, entry.offset + start * size, (stop - start) * size)
        return torch.frombuffer(buf, dtype=_DTYPES[entry.dtype])

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> ShardReader:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------- the plan: what merges with what
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
    vlm: dict[str, TensorEntry]  # storage order
    items: dict[str, MergeItem]  # by VLM name
    names: NameMap

    @property
    def mapped_numel(self) -> int:
        return sum(item.numel for item in self.items.values())


def plan_merge(vlm_dir: Path, llm_dir: Path) -> MergePlan:
    """Pair the two checkpoints' tensors by name and check every pair, before anything is written."""
    vlm, llm = read_checkpoint(vlm_dir), read_checkpoint(llm_dir)
    try:
        names = map_names(list(vlm), list(llm))
    except NameMapError as err:
        raise MergeError(f"{vlm_dir} vs {llm_dir}: {err}") from None
    items = {v: _pair(vlm[v], llm[b]) for v, b in names.pairs.items()}
    return MergePlan(vlm=vlm, items=items, names=names)


# ---------------------------------------------------------------- top-K by magnitude, streamed
@dataclass(frozen=True)
class MagnitudeCut:
    """Keep entries whose |T| float32 bits exceed `bits`, plus the first `ties` entries equal to it."""

    bits: int
    ties: int

    @staticmethod
    def keep_all() -> MagnitudeCut:
        return MagnitudeCut(-1, 0)

    @staticmethod
    def keep_none() -> MagnitudeCut:
        return MagnitudeCut(_FLOAT32_INF_BITS + 1, 0)

    @property
    def value(self) -> float:
        """The threshold as a float (|T| at the k-th largest entry)."""
        if self.bits < 0:
            return 0.0
        return struct.unpack("<f", struct.pack("<I", min(self.bits, _FLOAT32_INF_BITS)))[0]


def keep_count(density: float, n: int) -> int:
    """⌈K·n⌉, computed on the decimal value of K (0.3 · 10 is 3, not 4)."""
    return math.ceil(Fraction(repr(float(density))) * n)


def _last_bin_reaching(hist: np.ndarray, k: int) -> tuple[int, int]:
    """The highest bin b with (entries in bins ≥ b) ≥ k, and the count in bins > b."""
    at_or_above = np.cumsum(hist[::-1])[::-1]
    b = int(np.flatnonzero(at_or_above >= k)[-1])
    return b, int(at_or_above[b] - hist[b])


def find_cut(bit_chunks: Callable[[], Iterator[tuple[str, torch.Tensor]]], k: int, n: int) -> MagnitudeCut:
    """The exact k-th largest of n non-negative float32 values, given as (label, int32 bits) chunks.

    Two passes: a histogram of the 16 high bits finds the bin holding the k-th value, a histogram of
    the 16 low bits inside that bin finds the value. A NaN is an error naming its chunk's label.
    """
    if k >= n:
        return MagnitudeCut.keep_all()
    if k <= 0:
        return MagnitudeCut.keep_none()
    hi = np.zeros(_HI_BINS, dtype=np.int64)  # numpy's bincount is ~10x faster than torch's on CPU
    nan_bins = slice((_FLOAT32_INF_BITS >> 16) + 1, None)
    for label, bits in bit_chunks():
        hi += np.bincount(bits.numpy() >> 16, minlength=_HI_BINS)
        if hi[nan_bins].any():
            raise MergeError(f"task vector of {label!r} has NaN entries (a NaN or inf in a checkpoint)")
    b, above = _last_bin_reaching(hi, k)
    lo = np.zeros(_LO_BINS, dtype=np.int64)
    for _, bits in bit_chunks():
        chunk = bits.numpy()
        lo += np.bincount(chunk[(chunk >> 16) == b] & 0xFFFF, minlength=_LO_BINS)
    low, above_in_bin = _last_bin_reaching(lo, k - above)
    return MagnitudeCut((b << 16) | low, k - above - above_in_bin)


class CutState:
    """A cut being applied in storage order: hands out the tie slots first come, first served."""

    def __init__(self, cut: MagnitudeCut) -> None:
        self.bits, self.ties_left = cut.bits, cut.ties

    def mask(self, bits: torch.Tensor) -> torch.Tensor:
        keep = bits > self.bits
        if self.ties_left > 0:
            tied = (bits == self.bits).nonzero().flatten()[: self.ties_left]
            keep[tied] = True
            self.ties_left -= tied.numel()
        return keep


# ---------------------------------------------------------------- the merge
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

    def write_item(self, out, item: MergeItem, state: CutState | None) -> int:
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
        dtype = _DTYPES[item.vlm.dtype]
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

    def copy(self, out, file: Path, offset: int, nbytes: int) -> None:
        for start in range(0, nbytes, _COPY_BYTES):
            out.write(self.reader.read_bytes(file, offset + start, min(_COPY_BYTES, nbytes - start)))

    def run(self, out_dir: Path, report: MergeReport) -> None:
        scope_cut = self.global_cut() if self.config.scope == "global" else None
        if scope_cut is not None:
            report.global_threshold = scope_cut.value
            global_state = CutState(scope_cut)
        by_file: dict[Path, list[TensorEntry]] = {}
        for entry in self.plan.vlm.values():
            by_file.setdefault(entry.file, []).append(entry)
        with _progress(self.progress) as bar:
            task = bar.add_task("merge", total=sum(e.nbytes for e in self.plan.vlm.values()))
            for file, entries in by_file.items():
                self.merge_file(out_dir, report, file, entries, global_state if scope_cut is not None else None,
                                lambda n: bar.update(task, advance=n))

    def merge_file(self, out_dir: Path, report: MergeReport, file: Path, entries: list[TensorEntry],
                   state: CutState | None, advance: Callable[[int], None]) -> None:
        """One VLM shard → its merged copy: header as is, each tensor merged or copied in file order."""
        raw, _ = read_header(file)
        tmp = out_dir / (file.name + ".partial")
        with open(tmp, "wb") as out:
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
        os.replace(tmp, out_dir / file.name)


def _progress(enabled: bool) -> Progress:
    """Bytes merged so far (rich, as every mlan progress bar); silent when disabled."""
    return Progress(TextColumn("merge"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
                    console=Console(stderr=True), disable=not enabled)


def resolve_checkpoint(path_or_id: str | Path) -> Path:
    """A local checkpoint folder, or a hub id fetched (safetensors, configs, tokenizer) into the HF cache."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    text = str(path_or_id)
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise MergeError(f"{text}: not a checkpoint folder (and not a hub id of the form owner/name)")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(text, allow_patterns=["*.safetensors", "*.json", "*.txt", "*.model",
                                                            "*.jinja"]))
    except Exception as err:  # noqa: BLE001  (offline, gated, missing: one line naming the id)
        raise MergeError(f"{text}: no such folder, and the hub download failed ({type(err).__name__}: {err})")


def _copy_side_files(vlm_dir: Path, out_dir: Path) -> None:
    """Config, generation config, tokenizer, processor, chat template, the index: all but weights."""
    for src in sorted(vlm_dir.iterdir()):
        if src.is_file() and not src.name.endswith((".safetensors", ".bin", ".pt", ".pth", ".partial")):
            shutil.copy2(src, out_dir / src.name)


def merge_checkpoints(vlm: str | Path, llm: str | Path, out: str | Path, config: MergeConfig,
                      progress: bool = False) -> MergeReport:
    """Merge a VLM's language tower with its base LLM into `out` (a from_pretrained-loadable folder)."""
    t0 = time.perf_counter()
    vlm_dir, llm_dir, out_dir = resolve_checkpoint(vlm), resolve_checkpoint(llm), Path(out)
    if out_dir.resolve() in (vlm_dir.resolve(), llm_dir.resolve()):
        raise MergeError(f"--out {out_dir} must differ from the input checkpoints")
    if out_dir.exists() and any(out_dir.glob("*.safetensors")):
        raise MergeError(f"--out {out_dir} already holds safetensors weights; choose an empty folder")
    plan = plan_merge(vlm_dir, llm_dir)
    report = MergeReport(
        vlm=str(vlm), llm=str(llm), config=asdict(config), tensors=len(plan.vlm),
        mapped_tensors=len(plan.items), kept_vlm_tensors=len(plan.vlm) - len(plan.items),
        mapped_entries=plan.mapped_numel, cross_attention_layers=list(plan.names.cross_attention_layers),
        layer_map={str(k): v for k, v in plan.names.layer_map.items()},
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        with ShardReader() as reader:
            _Merger(plan, config, reader, progress).run(out_dir, report)
    finally:
        torch.set_num_threads(threads)
    _copy_side_files(vlm_dir, out_dir)
    report.seconds = round(time.perf_counter() - t0, 3)
    (out_dir / "merge.json").write_text(json.dumps(asdict(report), indent=2) + "\n")
    return report


# ---------------------------------------------------------------- sweep
def _point_name(alpha: float, density: float) -> str:
    return "vlm" if alpha == 0 else f"alpha{alpha:g}_density{density:g}"


@dataclass(frozen=True)
class SweepSpec:
    """A grid of merges, each scored with `mlan eval`."""

    vlm: str
    llm: str
    alphas: tuple[float, ...]
    densities: tuple[float, ...]
    tasks: tuple[str, ...]
    out: Path
    scope: Scope = "tensor"
    direction: Direction = "toward-llm"
    limit: int | None = None
    batch_size: int = 8
    max_new_tokens: int = 64
    images: str | None = None
    keep_models: bool = False


def _claim_sweep_folder(spec: SweepSpec) -> None:
    """Record what the folder's points were scored with; resuming with other settings would mix them."""
    free = ("alphas", "densities", "out", "keep_models", "batch_size")  # may change between runs
    what = {k: v for k, v in asdict(spec).items() if k not in free}
    what["tasks"] = list(what["tasks"])
    marker = spec.out / "sweep-spec.json"
    if marker.is_file():
        before = json.loads(marker.read_text())
        changed = sorted(k for k in what if before.get(k) != what[k])
        if changed:
            raise MergeError(f"{spec.out} holds a sweep with other {', '.join(changed)}; use another --out")
    spec.out.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(what, indent=2) + "\n")


def merge_sweep(spec: SweepSpec) -> list[dict]:
    """One merge per (α, K), evaluated and (unless kept) deleted; α = 0 is the VLM itself, scored once.

    Each point's results land in OUT/points/<name>/results.json as soon as it is scored, so a stopped
    sweep resumes where it stopped. Writes OUT/sweep.json, OUT/sweep.md and OUT/sweep.png.
    """
    from mlan.eval.harness import evaluate

    for a in spec.alphas:
        if not math.isfinite(a):
            raise MergeError(f"--alphas must be finite, got {a}")
    for k in spec.densities:
        MergeConfig(alpha=0.0, density=k)  # validates K
    _claim_sweep_folder(spec)
    rows: list[dict] = []
    for density in spec.densities:
        for alpha in spec.alphas:
            point = spec.out / "points" / _point_name(alpha, density)
            results_file = point / "results.json"
            if not results_file.is_file():
                model = spec.vlm
                if alpha != 0:
                    model = str(point / "model")
                    shutil.rmtree(model, ignore_errors=True)  # a half-written merge from a stopped sweep
                    merge_checkpoints(spec.vlm, spec.llm, model, MergeConfig(
                        alpha=alpha, density=density, scope=spec.scope, direction=spec.direction),
                        progress=sys.stderr.isatty())
                results = evaluate(model, list(spec.tasks), batch_size=spec.batch_size, limit=spec.limit,
                                   max_new_tokens=spec.max_new_tokens, images=spec.images)
                point.mkdir(parents=True, exist_ok=True)
                tmp = results_file.with_suffix(".partial")
                tmp.write_text(json.dumps(results, indent=2) + "\n")
                os.replace(tmp, results_file)
                if alpha != 0 and not spec.keep_models:
                    shutil.rmtree(model)
            results = json.loads(results_file.read_text())
            rows.append({"alpha": alpha, "density": density, "scope": spec.scope, "direction": spec.direction,
                         "language_avg": results.get("language_avg"), "vision_avg": results.get("vision_avg"),
                         "tasks": {n: t["accuracy"] for n, t in results["tasks"].items()},
                         "point": str(point.relative_to(spec.out))})
    spec.out.mkdir(parents=True, exist_ok=True)
    (spec.out / "sweep.json").write_text(json.dumps(rows, indent=2) + "\n")
    (spec.out / "sweep.md").write_text(sweep_table(rows))
    plot_sweep(rows, spec.out / "sweep.png")
    return rows


def _fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def sweep_table(rows: list[dict]) -> str:
    """A Markdown table: one row per (K, α), language and vision averages, then every task."""
    tasks = list(rows[0]["tasks"]) if rows else []
    head = ["K", "α", "language avg", "vision avg", *tasks]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"{r['density']:g}", f"{r['alpha']:g}", _fmt(r["language_avg"]), _fmt(r["vision_avg"])]
        lines.append("| " + " | ".join(cells + [_fmt(r["tasks"].get(t)) for t in tasks]) + " |")
    return "\n".join(lines) + "\n"


def plot_sweep(rows: list[dict], path: Path) -> None:
    """Language and vision averages against α, one line per K."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [g for g in ("language", "vision") if any(r[f"{g}_avg"] is not None for r in rows)]
    fig, axes = plt.subplots(1, max(len(groups), 1), figsize=(5 * max(len(groups), 1), 3.6), squeeze=False)
    for ax, group in zip(axes[0], groups):
        for density in sorted({r["density"] for r in rows}):
            pts = sorted((r["alpha"], r[f"{group}_avg"]) for r in rows
                         if r["density"] == density and r[f"{group}_avg"] is not None)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"K = {density:g}")
        ax.set_xlabel("α")
        ax.set_ylabel(f"{group} accuracy (%)")
        ax.set_title(f"{group} vs α")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
