"""Model files mlan agrees to read: safetensors only, with the header checked before anything trusts it.

A pickle checkpoint (`pytorch_model.bin`, `*.pt`) can run code when loaded, so mlan never unpickles one, not
even with `weights_only`. A safetensors file starts with an 8-byte little-endian header length and a JSON
header; a hostile or damaged file can claim a length of exabytes (a MemoryError when read) or hold JSON that
is not an object of tensor entries (a TypeError deep in the reader). Both are one-line `WeightsError`s here.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

from mlan.errors import WeightsError
from mlan.progress import LogSettings

# The safetensors reference implementation refuses headers over 100 MB; so does mlan (before reading them).
MAX_HEADER_BYTES = 100_000_000
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
INDEX_FILE = "model.safetensors.index.json"


def read_safetensors_header(file: str | Path) -> tuple[bytes, dict[str, Any]]:
    """The raw header bytes (8-byte length prefix included) and the parsed, type-checked JSON header.

    The length is checked against the file's size before it is read; every tensor entry must be an object
    with a string dtype, a shape of non-negative ints and data offsets inside the file's data section.
    """
    file = Path(file)
    size = os.path.getsize(file)
    with open(file, "rb") as f:
        prefix = f.read(8)
        if len(prefix) != 8:
            raise WeightsError(f"{file}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", prefix)
        if n > size - 8 or n > MAX_HEADER_BYTES:
            raise WeightsError(f"{file}: corrupt safetensors header (its length field says {n:,} bytes; "
                               f"the file holds {size:,})")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise WeightsError(f"{file}: corrupt safetensors header (not JSON: {err})") from None
    check_header(file, header, data_bytes=size - 8 - n)
    return prefix + raw, header


def check_header(file: Path, header: Any, data_bytes: int) -> None:
    """Types and bounds of a parsed header; raises WeightsError naming the file and the tensor."""
    if not isinstance(header, dict):
        raise WeightsError(f"{file}: corrupt safetensors header (a JSON {type(header).__name__}, not an object)")
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise WeightsError(f"{file}: corrupt safetensors header (__metadata__ is not an object of strings)")
            continue
        where = f"{file}: tensor {name!r}"
        if not isinstance(info, dict):
            raise WeightsError(f"{where}: corrupt safetensors header (entry is a {type(info).__name__}, "
                               "not an object)")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str):
            raise WeightsError(f"{where}: corrupt safetensors header (dtype {dtype!r})")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in shape):
            raise WeightsError(f"{where}: corrupt safetensors header (shape {shape!r})")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= data_bytes):
            raise WeightsError(f"{where}: corrupt safetensors header (data_offsets {offsets!r} outside the "
                               f"{data_bytes:,}-byte data section)")


def safetensors_files(directory: str | Path) -> list[Path]:
    """The safetensors weight files of a checkpoint folder; refuses a folder that holds only pickle weights."""
    directory = Path(directory)
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise WeightsError(f"{index}: not a safetensors index (no weight_map object: {err})") from None
        files = [directory / name for name in names]
        for f in files:
            if not f.is_file():
                raise WeightsError(f"{index}: names shard {f.name}, which is missing")
        return files
    files = sorted(directory.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in directory.iterdir() if p.is_file() and p.name.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise WeightsError(f"{directory}: only pickle weights ({', '.join(pickles)}); mlan loads safetensors only "
                           "and never unpickles: convert once where you trust the file "
                           "(from_pretrained + save_pretrained(safe_serialization=True))")
    raise WeightsError(f"{directory}: no *.safetensors weights")


def check_model_dir(path: str | Path) -> None:
    """Before `from_pretrained` on a local folder: safetensors present and every header sound.

    A hub id (not a local folder) is left to the caller; from_pretrained is then called with
    use_safetensors=True, which refuses a pickle-only repository without loading it.
    """
    directory = Path(path)
    if not directory.is_dir():
        return
    for file in safetensors_files(directory):
        read_safetensors_header(file)


# ---------------------------------------------------------------- a loaded model against its checkpoint
# safetensors dtypes of floating-point weights; an integer or bool tensor is only accepted where the model has an
# integer buffer of that name (e.g. an old CLIP checkpoint's `position_ids`).
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})


def _first(kind: str, names: list[str], directory: str | Path) -> str:
    more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
    return f"{directory}: tensor {names[0]!r} {kind}{more}; the folder does not hold the weights its config builds"


def check_loading_info(directory: str | Path, info: dict[str, Any]) -> None:
    """from_pretrained's loading report (names already mapped to the model's) as one WeightsError, if any.

    A tied lm_head is not in `missing_keys` (transformers ties it), so a tied model without one passes.
    """
    mismatched = sorted(info.get("mismatched_keys") or [], key=str)
    if mismatched:
        name, *shapes = mismatched[0] if isinstance(mismatched[0], tuple) else (mismatched[0],)
        found = f" (checkpoint {list(shapes[0])}, the config builds {list(shapes[1])})" if len(shapes) == 2 else ""
        raise WeightsError(_first(f"has the wrong shape{found}", [name], directory)
                           + (f" ({len(mismatched) - 1} more mismatched)" if len(mismatched) > 1 else ""))
    for kind, key in (("is missing", "missing_keys"), ("is not in the model (unexpected)", "unexpected_keys")):
        names = sorted(info.get(key) or [])
        if names:
            raise WeightsError(_first(kind, names, directory))
    errors = [str(e) for e in info.get("error_msgs") or []]
    if errors:
        raise WeightsError(f"{directory}: the weights do not load: {errors[0].splitlines()[0]}")


def check_tensor_dtypes(directory: str | Path, model: Any) -> None:
    """Every checkpoint tensor is floating point, as a float model's config implies (an int32 weight would be cast
    to float silently), except where the model itself holds an integer buffer of that name."""
    if not Path(directory).is_dir():
        return
    integer_buffers = {name.rsplit(".", 1)[-1] for name, buf in model.named_buffers() if not buf.is_floating_point()}
    for file in safetensors_files(directory):
        _, header = read_safetensors_header(file)
        for name, entry in header.items():
            if name == "__metadata__" or entry["dtype"] in FLOAT_DTYPES:
                continue
            if name.rsplit(".", 1)[-1] not in integer_buffers:
                raise WeightsError(f"{file}: tensor {name!r} is {entry['dtype']}; the model's weights are floating "
                                   "point (a damaged or foreign checkpoint)")


def check_finite(directory: str | Path, model: Any) -> None:
    """No NaN or inf in any loaded weight, checked tensor by tensor (no copy of the whole model)."""
    import torch  # lazy, as in load_checked: this module's header checks stay torch-free (`mlan train`'s launcher)

    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point() and tensor.device.type != "meta" and not bool(torch.isfinite(tensor).all()):
                raise WeightsError(f"{directory}: tensor {name!r} holds NaN or inf values")


def load_checked(from_pretrained: Any, path_or_id: str, other_half: tuple[str, ...] = (), **kwargs: Any) -> Any:
    """`cls.from_pretrained` (fp32, safetensors only) that refuses a damaged folder with one WeightsError naming
    the tensor: missing, unexpected or wrongly shaped (against the model the config builds), a non-float dtype,
    a non-finite value. Nothing is scored or trained on such a model. `other_half`: name prefixes a part may
    leave unused (a vision tower read from a full dual-encoder checkpoint leaves its text half)."""
    import torch  # lazy: the header checks above run in `mlan train`'s launcher, which never loads a model
    from transformers.utils import logging as hf_logging

    check_model_dir(path_or_id)
    kwargs = {"dtype": torch.float32, "use_safetensors": True, **kwargs}
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    if not LogSettings.from_env().verbose:  # `mlan -v` shows transformers' own report and bar
        hf_logging.set_verbosity_error()  # its multi-line load report would repeat what the one line below says
        hf_logging.disable_progress_bar()
    try:
        model, info = from_pretrained(path_or_id, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    if other_half:
        info = {**info, "unexpected_keys": [k for k in info.get("unexpected_keys") or []
                                            if not str(k).startswith(other_half)]}
    check_loading_info(path_or_id, info)
    check_tensor_dtypes(path_or_id, model)
    check_finite(path_or_id, model)
    return model
