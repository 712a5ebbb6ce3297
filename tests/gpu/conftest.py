"""Fixtures for the Lightning DeepSpeed check: the session's small corpus as Hydra overrides."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def corpus_overrides(corpus_dir: Path, data_cache: Path) -> list[str]:
    """Train on the suite's local corpus: the check's default (Shakespeare) needs a prepared download."""
    return [
        "data=files",
        f"data.paths=[{corpus_dir}/*.txt]",
        f"data.cache_dir={data_cache}",
        "data.vocab_size=512",
        "data.tokenize_workers=1",
        "data.loader_workers=0",
    ]
