"""Checkpoint I/O for the merge: where each tensor's bytes lie in a safetensors checkpoint, and positioned
reads of chunks of them, so a merge never maps or loads a whole model."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import snapshot_download

from mlan.errors import MlanError
from mlan.pretrained import is_pretrained_name, pretrained_dir
from mlan.weights import read_safetensors_header, safetensors_files

INDEX_FILE = "model.safetensors.index.json"

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class MergeError(MlanError, ValueError):
    """The merge cannot proceed; the message names the checkpoint, tensor or argument at fault."""



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
        return torch.empty((), dtype=DTYPES[self.dtype]).element_size()



def read_checkpoint(directory: Path) -> dict[str, TensorEntry]:
    """Every tensor of a safetensors checkpoint (one file or an indexed set of shards), in storage order."""
    entries: dict[str, TensorEntry] = {}
    for file in safetensors_files(directory):
        if not file.is_file():
            raise MergeError(f"{directory / INDEX_FILE}: names shard {file.name}, which is missing")
        raw, header = read_safetensors_header(file)
        for name, info in sorted(((k, v) for k, v in header.items() if k != "__metadata__"),
                                 key=lambda kv: kv[1]["data_offsets"][0]):
            if name in entries:
                raise MergeError(f"{directory}: tensor {name!r} appears in both {entries[name].file.name} "
                                 f"and {file.name}")
            if info["dtype"] not in DTYPES:
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
        return torch.frombuffer(buf, dtype=DTYPES[entry.dtype])

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> ShardReader:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()



def resolve_checkpoint(path_or_id: str | Path) -> Path:
    """A local checkpoint folder, a packaged base's name (`smollm2-135m-instruct`, mlan/pretrained.py), or a hub
    id fetched (safetensors, configs, tokenizer) into the HF cache."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    text = str(path_or_id)
    if is_pretrained_name(text):
        return pretrained_dir(text)
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise MergeError(f"{text}: not a checkpoint folder (and not a hub id of the form owner/name)")
    try:
        return Path(snapshot_download(text, allow_patterns=["*.safetensors", "*.json", "*.txt", "*.model",
                                                            "*.jinja"]))
    except Exception as err:  # noqa: BLE001  (offline, gated, missing: one line naming the id)
        raise MergeError(f"{text}: no such folder, and the hub download failed ({type(err).__name__}: {err})")
