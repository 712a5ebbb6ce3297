"""Reading sources for the pipeline: formats, the missing-text policy, bad UTF-8, corrupt files, subsets."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from orchestra.config import DataConfig, DataSource, MissingText, PipelineConfig, SourceSpec
from orchestra.data.errors import DataError
from orchestra.data.pipeline.ingest import ingest


def _records(folder: Path) -> list[dict]:
    out = []
    for path in sorted(folder.rglob("*.jsonl.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            out += [json.loads(line) for line in fh]
    return out


def _cfg(sources: list[SourceSpec], **pipeline: object) -> DataConfig:
    return DataConfig(
        source=DataSource.files, pipeline=PipelineConfig(enabled=True, sources=sources, **pipeline)
    )  # type: ignore[arg-type]


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    root = tmp_path / "corpus"
    root.mkdir()
    (root / "a.txt").write_bytes(b"caf\xc3\xa9 ok\n")
    (root / "bad.txt").write_bytes(b"broken \xff\xfe bytes\n")  # not UTF-8: replaced and counted
    lines = [{"text": "one"}, {"text": ""}, {"text": None}, {"other": "x"}, {"text": "two"}]
    with gzip.open(root / "b.jsonl.gz", "wt") as fh:
        fh.write("\n".join(json.dumps(r) for r in lines) + "\n")
    with open(root / "c.jsonl.zst", "wb") as raw:
        raw.write(zstandard.ZstdCompressor().compress(b'{"text": "three"}\n{"text": "four"}\n'))
    pq.write_table(pa.table({"text": ["five", None, "six"]}), root / "d.parquet")
    return root


def test_every_format_and_the_skip_policy(corpus: Path, tmp_path: Path) -> None:
    spec = SourceSpec(name="web", paths=[str(corpus / "*.txt"), str(corpus / "*.jsonl.gz"),
                                         str(corpus / "*.jsonl.zst"), str(corpus / "*.parquet")])  # fmt: skip
    counts = ingest(_cfg([spec]), tmp_path / "out", seed=0)["web"]
    texts = sorted(r["text"] for r in _records(tmp_path / "out"))
    assert texts == sorted(
        ["café ok\n", "broken \ufffd\ufffd bytes\n", "one", "two", "three", "four", "five", "six"]
    )
    assert counts.skipped == {"empty_text": 1, "null_text": 2, "missing_field": 1}
    assert counts.replaced_utf8 == 1 and counts.documents == 8 and counts.files == 5
    record = next(r for r in _records(tmp_path / "out") if r["text"] == "two")
    assert record["id"] == "web/b.jsonl.gz#5" and record["metadata"]["source"] == "web"


def test_fail_policy_names_the_file(corpus: Path, tmp_path: Path) -> None:
    spec = SourceSpec(name="web", paths=[str(corpus / "b.jsonl.gz")])
    with pytest.raises(DataError, match=r"b\.jsonl\.gz record 2: empty text"):
        ingest(_cfg([spec], missing_text=MissingText.fail), tmp_path / "out", seed=0)


def test_corrupt_files_are_one_error(tmp_path: Path) -> None:
    (tmp_path / "x.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=r"x\.parquet: not a readable Parquet file"):
        ingest(_cfg([SourceSpec(name="s", paths=[str(tmp_path / "x.parquet")])]), tmp_path / "o1", seed=0)
    (tmp_path / "y.jsonl.gz").write_bytes(gzip.compress(b'{"text": "a"}\n')[:-6])
    with pytest.raises(DataError, match=r"y\.jsonl\.gz: truncated or corrupt"):
        ingest(_cfg([SourceSpec(name="s", paths=[str(tmp_path / "y.jsonl.gz")])]), tmp_path / "o2", seed=0)


def test_subset_is_deterministic(tmp_path: Path) -> None:
    src = tmp_path / "many.jsonl"
    src.write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(500)))
    spec = SourceSpec(name="s", paths=[str(src)])
    runs = []
    for i, subset in enumerate([0.2, 0.2, 37, 37]):
        ingest(_cfg([spec], subset=subset), tmp_path / f"o{i}", seed=3)
        runs.append(sorted(r["id"] for r in _records(tmp_path / f"o{i}")))
    assert runs[0] == runs[1] and 70 <= len(runs[0]) <= 130  # a fifth, by hash
    assert runs[2] == runs[3] and len(runs[2]) == 37
    ingest(_cfg([spec], subset=37), tmp_path / "other-seed", seed=4)
    assert sorted(r["id"] for r in _records(tmp_path / "other-seed")) != runs[2]
