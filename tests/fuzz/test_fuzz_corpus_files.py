"""Fuzzed corpus files through ``prepare_dataset``: a dataset that loads and verifies, or one
DataError naming the culprit file -- never another exception, and never a change to a dataset
prepared earlier in the same cache dir.

Each example writes 1-3 files, sometimes after one good document (.txt of random bytes, invalid
UTF-8, empty or whitespace-only documents, huge lines; .jsonl with random, missing, null or
ill-typed fields, broken JSON, deep nesting, surrogate escapes; .parquet intact, truncated,
flipped or of the wrong column type; .jsonl.gz cut short) and prepares them under a fresh data.name next to a copy of a good dataset.
What should happen is worked out from the bytes by :func:`expected_file` (the reading rules of
orchestra/data/sources.py, restated), so a reader that silently accepts bad input fails too.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from orchestra.config import ConfigError, DataConfig
from orchestra.data.dataset import PackedDataset, load_manifest, verify_shards
from orchestra.data.errors import DataError
from orchestra.data.pack import prepare_dataset
from orchestra.data.shards import split_shards, stored_dtype
from orchestra.data.sources import SUPPORTED_SUFFIXES
from orchestra.io import TMP_MARK
from tests.fuzz import fuzzkit
from tests.fuzz.fuzzkit import FUZZ, flip, tree_digest


@pytest.fixture(scope="module")
def data_config(tmp_path_factory: pytest.TempPathFactory) -> DataConfig:
    """The data section the shared fuzz dataset was prepared with (fuzzkit)."""
    return fuzzkit.fuzz_data_config(tmp_path_factory)


@pytest.fixture(scope="module")
def base_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared, intact fuzz dataset (prepared once per session)."""
    return fuzzkit.fuzz_dataset(tmp_path_factory)


TEXT_FIELD = "text"

# ------------------------------------------------------------------ file strategies

text = st.text(max_size=200)  # any code point but lone surrogates
word_text = st.lists(st.from_regex(r"[A-Za-z0-9_=<>|]{1,8}", fullmatch=True), min_size=1, max_size=20).map(
    " ".join
)


def _parquet(values: Sequence[str | None] | Sequence[int], column: str = TEXT_FIELD) -> bytes:
    """A parquet file of one string column (an int64 one for a list of ints)."""
    kind = pa.int64() if values and isinstance(values[0], int) else pa.string()
    buf = io.BytesIO()
    pq.write_table(pa.table({column: pa.array(list(values), type=kind)}), buf)
    return buf.getvalue()


def _record(value: object, ascii_only: bool) -> bytes:
    return json.dumps({TEXT_FIELD: value}, ensure_ascii=ascii_only).encode()


good_line = st.one_of(
    st.builds(_record, text, st.booleans()),
    st.builds(_record, st.none(), st.booleans()),
    st.sampled_from([b"", b"  ", b"\r"]),  # blank lines are skipped
)
any_line = st.one_of(
    good_line,
    st.builds(
        _record, st.one_of(st.integers(), st.floats(), st.lists(st.integers(), max_size=2)), st.booleans()
    ),
    st.builds(lambda v: json.dumps({"other": v}).encode(), text),  # the field is missing
    st.sampled_from([b"[1]", b'"s"', b"3", b"null", b"{", b"\xff\xfe"]),  # not an object / not JSON
    st.binary(max_size=30),  # not JSON, often not UTF-8
)
surrogate_line = st.from_regex(r"[a-z ]{0,8}", fullmatch=True).map(
    lambda t: b'{"text": "a\\ud800' + t.encode() + b'"}'
)
deep_line = st.sampled_from([50, 100_000]).map(lambda n: b"[" * n + b"]" * n)


def _jsonl(lines: st.SearchStrategy[list[bytes]]) -> st.SearchStrategy[bytes]:
    """Lines joined by LF or CRLF, sometimes after a UTF-8 BOM."""
    return st.builds(
        lambda rows, sep, bom: (b"\xef\xbb\xbf" if bom else b"") + sep.join(rows),
        lines,
        st.sampled_from([b"\n", b"\r\n"]),
        st.booleans(),
    )


def _with(extra: st.SearchStrategy[bytes]) -> st.SearchStrategy[list[bytes]]:
    """Good lines with one ``extra`` line among them."""
    return st.builds(
        lambda a, x, b: [*a, x, *b], st.lists(good_line, max_size=3), extra, st.lists(good_line, max_size=3)
    )


parquet_texts = st.lists(text, min_size=1, max_size=3)
# kind -> (suffix, bytes). The kind only matters to the oracle for a flipped parquet.
KINDS: dict[str, tuple[str, st.SearchStrategy[bytes]]] = {
    "bytes": (".txt", st.binary(max_size=300)),
    "text": (".txt", text.map(str.encode)),
    "invalid-utf8": (
        ".txt",
        st.builds(
            lambda t, i, b: t[:i] + bytes([b]) + t[i:],
            text.map(str.encode),
            st.integers(0, 200),
            st.integers(0x80, 0xFF),
        ),
    ),
    "empty": (".txt", st.sampled_from([b"", b"   \n\n\t ", b"\xef\xbb\xbf", b"\xef\xbb\xbf \n"])),
    "huge-line": (
        ".txt",
        st.builds(
            lambda w, n: ((w + " ") * (n // (len(w) + 1) + 1))[:n].encode(),
            word_text,
            st.sampled_from([200_000, 1_500_000]),
        ),
    ),
    "jsonl": (".jsonl", _jsonl(st.lists(good_line, max_size=6))),
    "jsonl-fuzzed": (".jsonl", _jsonl(_with(any_line))),
    "jsonl-surrogate": (".jsonl", _jsonl(_with(surrogate_line))),
    "jsonl-deep": (".jsonl", _jsonl(_with(deep_line))),
    "parquet": (".parquet", st.lists(st.one_of(text, st.none()), max_size=5).map(_parquet)),
    "parquet-cut": (
        ".parquet",
        st.builds(lambda v, f: _parquet(v)[: int(f * len(_parquet(v)))], parquet_texts, st.floats(0, 0.99)),
    ),
    "parquet-flipped": (
        ".parquet",
        st.builds(
            lambda v, w, m: flip(_parquet(v), w, m), parquet_texts, st.floats(0, 1), st.integers(1, 255)
        ),
    ),
    "parquet-ints": (".parquet", st.lists(st.integers(0, 9), min_size=1, max_size=3).map(_parquet)),
    "parquet-other-column": (".parquet", parquet_texts.map(lambda v: _parquet(v, "body"))),
    "jsonl-gz-cut": (
        ".jsonl.gz",
        st.builds(lambda t, f: gzip.compress(_record(t, True))[: max(1, int(f * 60))], text, st.floats(0, 1)),
    ),
}
FILES = st.sampled_from(sorted(KINDS)).flatmap(
    lambda kind: st.tuples(st.just(kind), st.just(KINDS[kind][0]), KINDS[kind][1])
)
GOOD_DOC = ("text", ".txt", b"A first document that always reads.\n")


# ------------------------------------------------------------------ the oracle


@dataclass
class Expected:
    """What reading one file must give: its non-blank documents, or that it is refused."""

    documents: list[str] = field(default_factory=list)
    refused: bool = False
    unknown: bool = False  # either outcome is right (a flipped parquet, text with a lone surrogate)


def _utf8(raw: bytes, first: bool) -> str | None:
    if first and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _has_surrogate(doc: str) -> bool:
    return any(0xD800 <= ord(c) <= 0xDFFF for c in doc)


def expected_file(kind: str, suffix: str, raw: bytes) -> Expected:
    """The documents a correct reader yields from ``raw`` (blank ones dropped), or a refusal."""
    if kind == "parquet-flipped":
        return Expected(unknown=True)
    if suffix == ".txt":
        doc = _utf8(raw, first=True)
        if doc is None:
            return Expected(refused=True)
        return Expected([doc] if doc.strip() else [])
    if suffix == ".parquet":
        if kind in ("parquet-cut", "parquet-ints", "parquet-other-column"):
            return Expected(refused=True)
        values = pq.read_table(io.BytesIO(raw)).column(TEXT_FIELD).to_pylist()
        return Expected([v for v in values if v is not None and v.strip()])
    assert suffix == ".jsonl", suffix
    docs: list[str] = []
    for n, line_bytes in enumerate(io.BytesIO(raw)):
        line = _utf8(line_bytes, first=n == 0)
        if line is None:
            return Expected(refused=True)
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            return Expected(refused=True)
        if not isinstance(record, dict) or TEXT_FIELD not in record:
            return Expected(refused=True)
        value = record[TEXT_FIELD]
        if value is None:
            continue
        if not isinstance(value, str):
            return Expected(refused=True)
        if value.strip():
            docs.append(value)
    if any(_has_surrogate(d) for d in docs):  # refusing it (naming the file) or encoding it are both fine
        return Expected(unknown=True)
    return Expected(docs)


# ------------------------------------------------------------------ the property


@pytest.fixture(scope="module")
def earlier(base_dataset: Path) -> tuple[Path, dict[str, str]]:
    """The good dataset every example's cache dir starts with, and its files' hashes."""
    return base_dataset, tree_digest(base_dataset)


def eos_count(dataset_dir: Path) -> int:
    manifest = load_manifest(dataset_dir)
    dtype, eos = stored_dtype(manifest), int(manifest["eos_id"])
    return sum(
        int(np.count_nonzero(np.fromfile(path, dtype=dtype) == eos))
        for split in ("train", "val")
        for path, _ in split_shards(dataset_dir, manifest, split)
    )


def check_prepared(dataset_dir: Path, documents: list[str] | None) -> None:
    """A prepared dataset verifies, loads, and holds one EOS per non-blank document (when known)."""
    verify_shards(dataset_dir)
    manifest = load_manifest(dataset_dir)
    if documents is not None:
        assert manifest["corpus"]["documents"] == len(documents), manifest["corpus"]
        # A literal "<|endoftext|>" inside a document is text, not a document boundary.
        assert eos_count(dataset_dir) == len(documents)
    for split in ("train", "val"):
        if manifest["splits"][split]["tokens"] >= 2:
            dataset = PackedDataset(dataset_dir, split, 1, verify=True)
            assert len(dataset) >= 1 and dataset[len(dataset) - 1][0].shape == (1,)


@settings(FUZZ, max_examples=40)
@given(
    files=st.lists(FILES, min_size=1, max_size=3),
    with_good_doc=st.booleans(),
    use_glob=st.booleans(),
    own_tokenizer=st.booleans(),
)
def test_a_fuzzed_corpus_prepares_or_is_refused_naming_the_file(
    files: list[tuple[str, str, bytes]],
    with_good_doc: bool,
    use_glob: bool,
    own_tokenizer: bool,
    earlier: tuple[Path, dict[str, str]],
    data_config: DataConfig,
) -> None:
    """prepare_dataset on fuzzed files: success exactly when every file reads (with the right
    document count), else one DataError naming the first bad file; the earlier dataset is unchanged
    and a failed build leaves nothing behind."""
    good_dataset, before = earlier
    if with_good_doc:  # a readable document first, so that what follows decides the outcome
        files = [GOOD_DOC, *files]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cache = root / "cache"
        shutil.copytree(good_dataset, cache / good_dataset.name)
        corpus = root / "corpus"
        corpus.mkdir()
        paths = []
        for i, (kind, suffix, raw) in enumerate(files):
            path = corpus / f"{i:02d}-{kind}{suffix}"
            path.write_bytes(raw)
            paths.append(path)
        cfg = replace(
            data_config,
            name="fuzzed",
            paths=[str(corpus / "*")] if use_glob else [str(p) for p in paths],
            cache_dir=str(cache),
            vocab_size=280,
            tokenizer_path=str(good_dataset / "tokenizer.json") if not own_tokenizer else None,
        )

        # Which files are read, and what each must give.
        read = [p for p in paths if p.suffix in SUPPORTED_SUFFIXES] if use_glob else paths
        culprits: list[Path] = []
        must_fail = False
        if not read:
            culprits, must_fail = [corpus], True  # the glob matches nothing it can read
        elif not use_glob and any(p.suffix not in SUPPORTED_SUFFIXES for p in paths):
            culprits, must_fail = [next(p for p in paths if p.suffix not in SUPPORTED_SUFFIXES)], True
        documents: list[str] | None = []
        if not must_fail:
            for path, (kind, suffix, raw) in zip(paths, files, strict=True):
                if path not in read:
                    continue
                exp = expected_file(kind, suffix, raw)
                if exp.unknown:
                    culprits.append(path)
                    documents = None
                elif exp.refused:
                    culprits.append(path)
                    must_fail = True
                    break
                elif documents is not None:
                    documents.extend(exp.documents)
            if documents == []:  # an empty corpus is refused, naming its files
                culprits, must_fail = read, True

        for kind, _, _ in files:
            event(f"file: {kind}")
        event("expected: refused" if must_fail else "expected: prepared (or refused naming an unknown file)")
        try:
            dataset_dir = prepare_dataset(cfg, seed=0)
        except (DataError, ConfigError) as err:
            message = str(err)
            assert isinstance(err, DataError), message
            assert must_fail or culprits, ("refused a readable corpus", message)
            assert any(str(p) in message for p in culprits), (message, [p.name for p in culprits])
            assert not (cache / "fuzzed").exists()
            assert not [p for p in cache.iterdir() if TMP_MARK in p.name], sorted(cache.iterdir())
        else:
            assert not must_fail, ("accepted", [p.name for p in culprits])
            check_prepared(dataset_dir, documents)
        assert tree_digest(cache / good_dataset.name) == before


# Minimal reproducers of what the fuzzing found (kept apart: a fuzz run stops at its first failure).
KNOWN = {
    # json.loads raises RecursionError, which jsonl_records does not turn into a DataError
    "deep-nesting": (b'{"text": "ok"}\n' + b"[" * 100_000 + b"]" * 100_000 + b"\n", True),
    # a lone surrogate escape: UnicodeEncodeError from the BPE training in the spawned worker
    "surrogate-trained": (b'{"text": "ok"}\n{"text": "a\\ud800"}\n', True),
    # the same with a given tokenizer: TypeError from the encoding worker
    "surrogate-given-tokenizer": (b'{"text": "ok"}\n{"text": "a\\ud800"}\n', False),
}


@pytest.mark.parametrize("name", sorted(KNOWN))
def test_known_bad_jsonl_is_refused_naming_the_file(
    name: str, tmp_path: Path, base_dataset: Path, data_config: DataConfig
) -> None:
    """Each reproducer prepares, or fails with one DataError naming the file -- nothing else."""
    raw, own_tokenizer = KNOWN[name]
    path = tmp_path / f"{name}.jsonl"
    path.write_bytes(raw)
    cfg = replace(
        data_config,
        name=name,
        paths=[str(path)],
        cache_dir=str(tmp_path / "cache"),
        vocab_size=280,
        tokenizer_path=None if own_tokenizer else str(base_dataset / "tokenizer.json"),
    )
    try:
        prepare_dataset(cfg, seed=0)
    except DataError as err:
        assert str(path) in str(err), str(err)


# ------------------------------------------------------------------ a single long run of one character

_PREPARE = """
import sys
from orchestra.config import DataConfig, DataSource
from orchestra.data.pack import prepare_dataset
if __name__ == "__main__":
    cfg = DataConfig(name="long-run", source=DataSource.files, paths=[sys.argv[1]], cache_dir=sys.argv[2],
                     vocab_size=280, tokenize_workers=1)
    print(prepare_dataset(cfg, seed=0))
"""


def test_a_long_run_of_one_character_prepares_in_seconds(tmp_path: Path) -> None:
    """A 500 kB line of one repeated character (padding, a separator) prepares in well under 20 s.

    Run in a subprocess killed on timeout: a hung BPE training cannot be interrupted in-process.
    """
    corpus = tmp_path / "padding.txt"
    corpus.write_bytes(b"=" * 500_000)
    script = tmp_path / "prepare.py"
    script.write_text(_PREPARE)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(corpus), str(tmp_path / "cache")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.communicate()
        pytest.fail("prepare_dataset on a 500 kB run of '=' did not finish in 20 s (the BPE training hangs)")
    assert proc.returncode == 0, out[-2000:]
