"""Shared pieces of the fuzz tests (test_fuzz_overrides, _corpus_files, _damaged_datasets,
_checkpoint_files): reproducible hypothesis settings, byte-level helpers, and one small corpus and
dataset prepared once per session.

The corpus and dataset are plain cached builders that each module wraps in its own fixtures (no
conftest.py, so that this directory can hold other fuzz modules without a fixture clash).
"""

from __future__ import annotations

import hashlib
import shutil
import sysconfig
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, settings

from orchestra.config import DataConfig, DataSource

# Reproducible in CI: a fixed example sequence, no example database, no per-example deadline.
# No shrinking: each example costs real work (a compose, a subprocess, a dataset build), so a
# failure is reported as found; the minimal reproducers of known bugs are separate plain tests.
FUZZ = settings(
    deadline=None,
    derandomize=True,
    database=None,
    phases=(Phase.explicit, Phase.generate),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (lock files excluded), keyed by relative path."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.endswith(".lock")
    }


def flip(raw: bytes, where: float, mask: int) -> bytes:
    """``raw`` with the byte at fraction ``where`` XOR-ed with ``mask`` (non-zero: always a change)."""
    at = min(int(where * len(raw)), len(raw) - 1)
    return raw[:at] + bytes([raw[at] ^ mask]) + raw[at + 1 :]


FUZZ_FILES = ["textwrap.py", "shlex.py", "heapq.py"]  # ~90 kB: prepares in a few seconds
FUZZ_VOCAB = 300
# Built once per session, whichever module asks first.
_BUILT: dict[str, object] = {}


def fuzz_data_config(tmp_path_factory: pytest.TempPathFactory) -> DataConfig:
    """The data section of every fuzz test that needs a prepared dataset: three standard-library
    sources as .txt documents, a small vocab, one worker."""
    if "config" not in _BUILT:
        corpus = tmp_path_factory.mktemp("fuzz-corpus")
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        for name in FUZZ_FILES:
            shutil.copy(stdlib / name, corpus / (name + ".txt"))
        _BUILT["config"] = DataConfig(
            name="fuzz-base",
            source=DataSource.files,
            paths=[str(corpus / "*.txt")],
            cache_dir=str(tmp_path_factory.mktemp("fuzz-data-cache")),
            vocab_size=FUZZ_VOCAB,
            tokenize_workers=1,
            loader_workers=0,
        )
    config = _BUILT["config"]
    assert isinstance(config, DataConfig)
    return config


def fuzz_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``<cache>/fuzz-base``, prepared once; tests copy it before damaging anything."""
    from orchestra.data.pack import prepare_dataset

    if "dataset" not in _BUILT:
        _BUILT["dataset"] = prepare_dataset(fuzz_data_config(tmp_path_factory), seed=0)
    dataset = _BUILT["dataset"]
    assert isinstance(dataset, Path)
    return dataset
