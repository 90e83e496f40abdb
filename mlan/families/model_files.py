"""The model files a recipe names, checked before any worker starts: torch-free, so that `mlan train`'s launcher
fails fast on a missing or damaged checkpoint without loading torch and transformers (seconds per run)."""
from __future__ import annotations

from pathlib import Path

from mlan.errors import MlanError
from mlan.families.base import ModelBuildError
from mlan.pretrained import gguf_path, is_pretrained_name
from mlan.recipe import ModelSpec
from mlan.weights import check_model_dir


def check_model_files(model_spec: ModelSpec) -> None:
    """Before any worker starts: each checkpoint the recipe names (model.config, model.llm,
    model.vision_tower) is a local folder with sound safetensors weights, or a hub id; a path that is not
    there is a ModelBuildError naming the key."""
    named = {"model.llm": model_spec.llm, "model.vision_tower": model_spec.vision_tower}
    if model_spec.config not in ("tiny", "compose") and not (model_spec.llm or model_spec.vision_tower):
        named["model.config"] = model_spec.config
    for key, value in named.items():
        if not value or (key == "model.vision_tower" and value == "tiny"):  # a random tower: no files
            continue
        if is_pretrained_name(value):  # a named offline base: its package must be there (one line if not)
            gguf_path(value)
            continue
        path = Path(value).expanduser()
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise ModelBuildError(f"{key}: {value}: not a model folder (no config.json)")
            try:
                check_model_dir(path)
            except MlanError as err:
                raise ModelBuildError(f"{key}: {err}") from None
        elif path.exists() or value.startswith((".", "/", "~")) or value.count("/") != 1:
            raise ModelBuildError(f"{key}: {value}: no such model folder (and not a hub id of the form owner/name)")
