"""Shared test setup: offline, real data from ../shared/data (skipped with a reason when absent)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MLAN_SHARED_DATA", REPO.parent / "shared" / "data"))
# The shipped recipes name their data as ${MLAN_SHARED_DATA:-../../shared/data}/…: point them at the same folder.
os.environ.setdefault("MLAN_SHARED_DATA", str(SHARED_DATA))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real public data of ../shared/data; tests that need it skip when it is absent."""
    if not (SHARED_DATA / "README.md").is_file():
        pytest.skip(f"real data folder not found at {SHARED_DATA} (set MLAN_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def llama3_tokenizer():
    """The offline Llama-3 tokenizer (converted once per cache, then loaded from disk)."""
    from mlan.tokenizer import load_tokenizer

    return load_tokenizer("llama3")


# ---------------------------------------------------------------- built once per session, read by several tests
@pytest.fixture(scope="session")
def local_ray():
    """One local Ray for the session's in-process builds: build() joins an initialized Ray instead of starting
    (and stopping) its own, which costs seconds each time."""
    import ray

    if ray.is_initialized():
        yield
        return
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def shared_data_build(local_ray, shared_data, tmp_path_factory):
    """recipes/shared-data.yaml as shipped (2M tokens), built once with 2 workers: (recipe, ROOT, stats) with the
    build in ROOT/out and its tokenized cache in ROOT/cache. Readers write only to folders of their own."""
    from mlan.mixture.build import build
    from mlan.recipe import load_recipe

    root = tmp_path_factory.mktemp("shared-data-build")
    recipe = load_recipe(REPO / "recipes" / "shared-data.yaml")
    stats = build(recipe, str(root / "out"), workers=2, cache_dir=str(root / "cache"), progress=False)
    return recipe, root, stats


TINY_REAL_BUILD = ["mixture.budget.tokens=10000", "mixture.seq_len=256", "shards.target_tokens=4000"]


@pytest.fixture(scope="session")
def tiny_real_builds(local_ray, shared_data, tmp_path_factory) -> dict[str, Path]:
    """recipes/tiny-{llava,mllama}.yaml over the real data, small (10k tokens in rows of 256, ~3 shards each):
    {family: build folder}. Read by the loader and training tests; runs write beside them, never into them."""
    from mlan.mixture.build import build
    from mlan.recipe import load_recipe

    root = tmp_path_factory.mktemp("tiny-real")
    out = {}
    for family in ("llava", "mllama"):
        recipe = load_recipe(REPO / "recipes" / f"tiny-{family}.yaml", TINY_REAL_BUILD)
        build(recipe, str(root / family), workers=1, cache_dir=str(root / "cache"), progress=False)
        out[family] = root / family
    return out


@pytest.fixture(scope="module")
def tiny_llava_dir(tmp_path_factory) -> Path:
    """A fixed (seeded) tiny LLaVA with the offline Llama-3 tokenizer, saved as a model folder (eval tests)."""
    import torch
    from transformers import LlavaForConditionalGeneration

    from mlan.families.tiny import tiny_llava_config
    from mlan.tokenizer import load_tokenizer

    out = tmp_path_factory.mktemp("tiny_llava")
    torch.manual_seed(0)
    LlavaForConditionalGeneration(tiny_llava_config()).save_pretrained(out)
    load_tokenizer("llama3").save_pretrained(out)
    return out
