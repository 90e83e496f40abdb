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
