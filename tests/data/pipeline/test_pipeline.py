"""orchestra-prepare with data.pipeline: a mixed corpus through every stage into packed shards,
with the manifest's counts, the exclusions and the data card agreeing with what went in."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pytest

from orchestra.config import (
    CleanConfig,
    DataConfig,
    DataSource,
    DedupConfig,
    LanguageConfig,
    PIIConfig,
    PipelineConfig,
    SourceSpec,
)
from orchestra.data.errors import DataError
from orchestra.data.pack import prepare_dataset

pytestmark = pytest.mark.slow

PARAGRAPH = (
    "The committee met on Tuesday to discuss the harvest. Everyone agreed that the rain had come late, "
    "and that the wheat would need another week before it could be cut. The miller asked whether the "
    "road to the village would be repaired before the carts were loaded, and the mayor promised to look "
    "into it. "
)
WORDS = sorted(set(PARAGRAPH.lower().replace(",", "").replace(".", "").split()))


def _words(seed: int, n: int = 8) -> str:
    return " ".join(random.Random(seed).sample(WORDS, n))


def _write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def _lines(folder: Path) -> list[dict]:
    """Every record of the jsonl(.gz) files under ``folder``."""
    out = []
    for path in sorted(folder.rglob("*.jsonl*")):
        with gzip.open(path, "rt") if path.name.endswith(".gz") else open(path) as fh:
            out += [json.loads(line) for line in fh if line.strip()]
    return out


def test_pipeline_end_to_end(tmp_path: Path) -> None:
    # Documents differ by words, not only digits: exact dedup folds digits as datatrove does.
    news = [
        f"Report on {_words(i)}. " + PARAGRAPH * 3 + f"The day ended with {_words(100 + i)}."
        for i in range(30)
    ]
    news += [news[3], news[7]]  # exact copies
    news.append("Contact jane.roe@example.org or 192.168.10.20 about day 9. " + PARAGRAPH * 3)
    news.append("Le comité s'est réuni mardi pour parler de la récolte. " * 12)  # not English
    news.append("")  # no text: skipped and counted
    src_a = _write_jsonl(tmp_path / "news.jsonl", news)
    src_b = _write_jsonl(
        tmp_path / "notes.jsonl",
        [f"Note on {_words(200 + i)}: " + PARAGRAPH * 2 for i in range(10)] + ["short"],
    )
    pipeline = PipelineConfig(
        enabled=True,
        sources=[
            SourceSpec(name="news", paths=[str(src_a)], license="CC-BY-4.0"),
            SourceSpec(name="notes", paths=[str(src_b)], license="CC0-1.0"),
        ],
        clean=CleanConfig(min_chars=40),
        language=LanguageConfig(keep=["en"]),
        pii=PIIConfig(enabled=True),
        dedup=DedupConfig(exact=True),
        tasks=2,
        workers=1,
    )
    cfg = DataConfig(name="mixed", source=DataSource.files, cache_dir=str(tmp_path / "data"), vocab_size=300,
                     pipeline=pipeline)  # fmt: skip
    out = prepare_dataset(cfg, seed=0)
    manifest = json.loads((out / "manifest.json").read_text())
    record = manifest["pipeline"]
    assert record["ingest"]["news"]["skipped"] == {"empty_text": 1}
    assert record["dropped"].get("dedup:exact") == 2
    assert record["dropped"].get("clean:too_short") == 1  # "short"
    assert record["dropped"].get("language:not_in_keep_list") == 1
    assert record["kept_by_source"] == {"news": 31, "notes": 10}
    assert record["kept_documents"] == 41 and record["languages"].get("en") == 41
    assert set(record["tokens_by_source"]) == {"news", "notes"}
    assert sum(record["tokens_by_source"].values()) == sum(s["tokens"] for s in manifest["splits"].values())
    kept = _lines(out / "pipeline" / "kept")
    assert not any("jane.roe@example.org" in r["text"] for r in kept)
    assert any("<EMAIL>" in r["text"] and "<IP_ADDRESS>" in r["text"] for r in kept)
    reasons = [r["metadata"]["filter_reason"] for r in _lines(out / "pipeline" / "exclusions")]
    assert sorted(reasons) == sorted(k for k, v in record["dropped"].items() for _ in range(v))
    card = (out / "datacard.md").read_text()
    assert "CC-BY-4.0" in card and "dedup:exact" in card and "| en | 41 |" in card
    assert not (out / "pipeline" / "ingest").exists()  # intermediates removed

    # Reused when nothing changed.
    before = (out / "manifest.json").read_text()
    assert prepare_dataset(cfg, seed=0) == out and (out / "manifest.json").read_text() == before


def test_a_corpus_empty_after_filtering_is_one_error_and_no_dataset(tmp_path: Path) -> None:
    src = _write_jsonl(tmp_path / "tiny.jsonl", ["a", "bb", "ccc"])
    pipeline = PipelineConfig(enabled=True, sources=[SourceSpec(name="tiny", paths=[str(src)])],
                              clean=CleanConfig(min_chars=100), tasks=1, workers=1)  # fmt: skip
    cfg = DataConfig(name="empty", source=DataSource.files, cache_dir=str(tmp_path / "data"), vocab_size=300,
                     pipeline=pipeline)  # fmt: skip
    with pytest.raises(
        DataError, match=r"no document survived the filters \(dropped by clean:too_short: 3\)"
    ):
        prepare_dataset(cfg, seed=0)
    assert not (tmp_path / "data" / "empty").exists()


def test_a_crashed_prepare_resumes_its_pipeline_without_redoing_finished_tasks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import orchestra.data.pack as pack

    texts = [f"Entry on {_words(i)}. " + PARAGRAPH * 2 for i in range(24)]
    src = _write_jsonl(tmp_path / "entries.jsonl", texts + texts[:3])
    pipeline = PipelineConfig(enabled=True, sources=[SourceSpec(name="entries", paths=[str(src)])],
                              dedup=DedupConfig(exact=True), tasks=3, workers=1)  # fmt: skip
    cfg = DataConfig(name="resume", source=DataSource.files, cache_dir=str(tmp_path / "data"), vocab_size=300,
                     pipeline=pipeline)  # fmt: skip
    real = pack._run_in_spawned_process

    def crash(*args: object) -> object:
        raise RuntimeError("node lost while training the tokenizer")

    monkeypatch.setattr(pack, "_run_in_spawned_process", crash)
    with pytest.raises(RuntimeError, match="node lost"):
        prepare_dataset(cfg, seed=0)
    assert not (tmp_path / "data" / "resume").exists()  # nothing that looks like a dataset
    (work,) = (tmp_path / "data").glob(".resume.pipeline-*")
    markers = {
        p.relative_to(work / "logs"): p.stat().st_mtime_ns for p in (work / "logs").rglob("completions/*")
    }
    assert len(markers) == 3 + 3 + 3 + 3  # filter, exact hashes / find / filter: 3 tasks each
    assert len(list((work / "ingest" / "entries").glob("*.jsonl.gz"))) == 3  # dealt over the tasks

    monkeypatch.setattr(pack, "_run_in_spawned_process", real)
    out = prepare_dataset(cfg, seed=0)
    again = {p.relative_to(out / "pipeline" / "logs"): p.stat().st_mtime_ns
             for p in (out / "pipeline" / "logs").rglob("completions/*")}  # fmt: skip
    assert again == markers  # every task was skipped, none redone
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["pipeline"]["dropped"] == {"dedup:exact": 3}
    assert manifest["pipeline"]["kept_documents"] == 24
    assert not list((tmp_path / "data").glob(".resume.pipeline-*"))  # moved into the dataset
    stages = {s["name"]: s for s in manifest["pipeline"]["stages"]}
    assert (
        stages["filter-entries"]["documents_in"] == 27 and stages["dedup-exact-filter"]["documents_out"] == 24
    )
