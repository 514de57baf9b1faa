"""Shared test fixtures: the offline assets in ../shared/data and a few helpers.

The real GPT-2 tokenizer files, the HellaSwag val set and tiny shakespeare live in
`../shared/data` (override with SHARED_DATA=/path). A test that needs one of them skips
with the reason when it is absent; with REQUIRE_SHARED_DATA=1 (set by .ci/run) the
skip becomes a failure, so in CI those tests always run.
"""
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # `import train_gpt2` etc. from any working directory

SHARED_DATA = Path(os.environ.get("SHARED_DATA", REPO.parent / "shared" / "data")).resolve()
REQUIRE = os.environ.get("REQUIRE_SHARED_DATA", "0") == "1"


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        msg = f"{what} not found at {path} (set SHARED_DATA to the shared/data folder)"
        if REQUIRE:
            pytest.fail(msg + "; REQUIRE_SHARED_DATA=1 forbids skipping", pytrace=False)
        pytest.skip(msg)
    return path


@pytest.fixture
def tiktoken_cache(monkeypatch):
    """Points tiktoken at the offline GPT-2 tokenizer files (in this process and in subprocesses)."""
    path = _need(SHARED_DATA / "tiktoken_cache", "GPT-2 tokenizer files (tiktoken cache)")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(path))
    return path


@pytest.fixture
def hellaswag_val_file():
    return _need(SHARED_DATA / "hellaswag" / "hellaswag_val.jsonl", "HellaSwag val set")


@pytest.fixture
def shakespeare_file():
    return _need(SHARED_DATA / "tinyshakespeare" / "input.txt", "tiny shakespeare")
