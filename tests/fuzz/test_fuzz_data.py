"""Fuzzed corpora and damaged prepared datasets (hypothesis).

A corpus of random bytes, invalid UTF-8, huge lines, empty documents or broken jsonl/gzip either
prepares into a dataset that loads and verifies, or fails with one DataError/ConfigError that
names the file; a damaged shard or manifest is refused naming it. Never another exception, and
an earlier dataset in the same cache dir is left byte for byte as it was.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestra.config import ConfigError, DataConfig, DataSource
from orchestra.data.dataset import PackedDataset
from orchestra.data.errors import DataError
from orchestra.data.pack import prepare_dataset
from orchestra.data.shards import load_manifest

pytestmark = pytest.mark.slow

FUZZ = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
SEQ_LEN = 16
# What the examples did, printed at the end of the module (pytest -s) for docs/reliability.md.
OUTCOMES: Counter[str] = Counter()


@pytest.fixture(scope="module", autouse=True)
def report_outcomes() -> Iterator[None]:
    yield
    print("\nfuzz outcomes:", dict(sorted(OUTCOMES.items())))


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.endswith(".lock")
    }


def data_config(paths: list[str], cache: Path, name: str) -> DataConfig:
    return DataConfig(
        name=name,
        source=DataSource.files,
        paths=paths,
        cache_dir=str(cache),
        vocab_size=300,
        tokenize_workers=1,
        val_fraction=0.2,
    )


# One corpus file: its suffix and its bytes.
text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=400)
files = st.one_of(
    st.tuples(st.just(".txt"), st.binary(max_size=2000)),  # random bytes, mostly invalid UTF-8
    st.tuples(st.just(".txt"), text.map(str.encode)),
    st.tuples(st.just(".txt"), st.sampled_from([b"", b"   \n\n\t ", b"\xef\xbb\xbf"])),  # empty documents
    st.tuples(st.just(".txt"), st.integers(1, 400_000).map(lambda n: b"x" * n)),  # one huge line
    st.tuples(
        st.just(".jsonl"),
        st.lists(
            st.one_of(
                st.fixed_dictionaries({"text": st.one_of(text, st.none(), st.integers())}),
                st.dictionaries(st.text(max_size=5), text, max_size=2),
                st.binary(max_size=40).map(lambda b: b.decode("latin-1")),  # a line that is not JSON
            ),
            max_size=6,
        ).map(lambda rows: "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows).encode()),
    ),
    st.tuples(
        st.just(".jsonl.gz"),
        st.tuples(text, st.floats(0.1, 1.0)).map(
            lambda tf: gzip.compress(json.dumps({"text": tf[0]}).encode())[: max(1, int(40 * tf[1]))]
        ),
    ),
)


@pytest.fixture(scope="module")
def earlier(corpus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A cache dir holding one good dataset, and its files' hashes."""
    cache = tmp_path_factory.mktemp("fuzz-cache")
    prepare_dataset(data_config([str(corpus_dir / "*.txt")], cache, "good"), seed=0)
    return cache, tree_digest(cache / "good")


@settings(FUZZ, max_examples=12)
@given(corpus=st.lists(files, min_size=1, max_size=3))
def test_a_fuzzed_corpus_prepares_or_is_refused_naming_the_file(
    corpus: list[tuple[str, bytes]], earlier: tuple[Path, dict[str, str]]
) -> None:
    cache, before = earlier
    with tempfile.TemporaryDirectory() as tmp:
        names = []
        for i, (suffix, raw) in enumerate(corpus):
            path = Path(tmp) / f"doc{i}{suffix}"
            path.write_bytes(raw)
            names.append(path)
        name = "fuzz-" + hashlib.sha256(repr(corpus).encode()).hexdigest()[:12]
        cfg = data_config([str(p) for p in names], cache, name)
        try:
            dataset_dir = prepare_dataset(cfg, seed=0)
        except (DataError, ConfigError) as err:
            OUTCOMES["corpus refused"] += 1
            message = str(err)
            assert any(str(p) in message or p.name in message for p in names) or "data." in message, message
            assert "Traceback" not in message
        else:
            OUTCOMES["corpus prepared"] += 1
            manifest = load_manifest(dataset_dir)
            assert manifest["splits"]["train"]["tokens"] > 0
            try:
                dataset = PackedDataset(dataset_dir, "train", SEQ_LEN, verify=True)
            except DataError as err:  # prepared, but too small for one window
                assert "fewer than" in str(err), err
            else:
                assert len(dataset) >= 1 and dataset[0][0].shape == (SEQ_LEN,)
        finally:
            shutil.rmtree(cache / name, ignore_errors=True)
    assert tree_digest(cache / "good") == before


# ------------------------------------------------------------------ damaged datasets


@pytest.fixture(scope="module")
def prepared(corpus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("fuzz-prepared")
    return prepare_dataset(data_config([str(corpus_dir / "*.txt")], cache, "base"), seed=0)


damage = st.tuples(
    st.sampled_from(["truncate", "flip", "append", "delete"]),
    st.integers(0, 10_000),  # which file
    st.floats(0.0, 1.0),  # where
    st.integers(1, 255),  # the XOR mask of a flipped byte (never 0: a flip always changes it)
)


@settings(FUZZ, max_examples=40)
@given(change=damage)
def test_a_damaged_shard_or_manifest_is_refused_naming_it(
    change: tuple[str, int, float, int], prepared: Path
) -> None:
    how, which, where, mask = change
    before = tree_digest(prepared)
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "dataset"
        shutil.copytree(prepared, copy)
        targets = sorted(
            p for p in copy.iterdir() if p.suffix in (".bin", ".json") or p.name == "manifest.json"
        )
        target = targets[which % len(targets)]
        raw = target.read_bytes()
        at = min(int(where * len(raw)), max(len(raw) - 1, 0))
        if how == "truncate":
            target.write_bytes(raw[:at])
        elif how == "flip" and raw:
            target.write_bytes(raw[:at] + bytes([raw[at] ^ mask]) + raw[at + 1 :])
        elif how == "append":
            target.write_bytes(raw + b"\0" * (1 + at % 7))
        else:
            target.unlink()
        changed = (target.exists() and target.read_bytes() != raw) or not target.exists()
        same_json = False
        if target.name == "manifest.json" and target.exists():
            try:
                same_json = json.loads(target.read_bytes()) == json.loads(raw)
            except (ValueError, UnicodeDecodeError):
                same_json = False
        try:
            for split in ("train", "val"):
                PackedDataset(copy, split, SEQ_LEN, verify=True)
        except (DataError, ConfigError) as err:
            OUTCOMES[f"{how} {target.suffix} refused"] += 1
            assert target.name in str(err) or "manifest" in str(err), (how, target.name, str(err))
        else:
            # Only a change nobody reads back may pass: manifest bytes that parse to the same
            # manifest, or a file the dataset does not use.
            OUTCOMES[f"{how} {target.suffix} passed"] += 1
            used = target.name == "manifest.json" or target.name in json.dumps(load_manifest(prepared))
            assert not changed or same_json or not used, (how, target.name)
    assert tree_digest(prepared) == before
