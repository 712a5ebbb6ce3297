"""bench/data.py on a tiny corpus: the corpus recipe, the CSV rows and table, and the token-id check.

Speed is not checked (a 1 MB corpus on a shared CPU says nothing about it); the numbers' consistency
is, and above all that the three tokenizations give the same ids for every document.
"""

from __future__ import annotations

import csv
import importlib
import itertools
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="module")
def bench():
    return importlib.import_module("bench.data")  # bench/ is a package beside tests/


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """main() sets the tokenizer thread variables; they are put back after the test."""
    monkeypatch.setenv("RAYON_NUM_THREADS", "2")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")


def test_generated_pages_are_deterministic_and_web_like(bench) -> None:
    sentences = bench.docstring_sentences(max_chars=60_000)
    assert len(sentences) > 100 and all(len(s) >= 4 and s[-1][-1] in ".!?" for s in sentences)
    first = list(itertools.islice(bench.web_documents(7, sentences), 400))
    again = list(itertools.islice(bench.web_documents(7, sentences), 400))
    other = list(itertools.islice(bench.web_documents(8, sentences), 400))
    assert first == again and first != other
    assert len(set(first)) < len(first)  # exact copies are planted
    assert any("@example.com" in d or "+1 555" in d or "192.0.2." in d for d in first)  # PII
    assert any(len(d) < 200 for d in first)  # pages too short to keep
    assert all("<|endoftext|>" not in d for d in first)  # no special-token text (see the module doc)


def test_corpus_is_reused_only_for_the_same_recipe(bench, tmp_path: Path) -> None:
    info = bench.make_corpus(tmp_path / "c", 0.2, seed=1)
    assert info.bytes >= 200_000 and info.documents == len(bench.read_documents(info.files))
    docs = bench.read_documents(info.files)
    stamp = info.files[0].stat().st_mtime_ns
    assert bench.make_corpus(tmp_path / "c", 0.2, seed=1).files[0].stat().st_mtime_ns == stamp
    changed = bench.make_corpus(tmp_path / "c", 0.2, seed=2)
    assert changed.seed == 2 and bench.read_documents(changed.files) != docs


def test_rounds_rotate_the_order(bench) -> None:
    assert bench.rounds_order(4) == [
        ["ours", "hf-tokenizers", "hf-datasets"],
        ["hf-tokenizers", "hf-datasets", "ours"],
        ["hf-datasets", "ours", "hf-tokenizers"],
        ["ours", "hf-tokenizers", "hf-datasets"],
    ]


@pytest.mark.slow
def test_tiny_run_writes_consistent_rows(bench, tmp_path: Path, clean_env: None, capsys) -> None:
    path = tmp_path / "data.csv"
    out = bench.main(["--mb", "1", "--pipeline-mb", "0.5", "--rounds", "1", "--vocab", "2048",
                      "--train-mb", "1", "--work", str(tmp_path / "work"), "--csv", str(path)])  # fmt: skip
    printed = capsys.readouterr().out
    assert "| ours |" in printed and "| hf-datasets |" in printed and "| filter-files |" in printed
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == bench.CSV_FIELDS
        rows = list(reader)
    tokenize = {r["method"]: r for r in rows if r["section"] == "tokenize"}
    assert list(tokenize) == list(bench.METHODS)
    ours = tokenize["ours"]
    for name, row in tokenize.items():
        assert row["check"] == "ok", row  # every document's ids identical to hf-tokenizers'
        assert row["tokens"] == ours["tokens"] and row["documents_in"] == ours["documents_in"]
        assert row["date"] and row["device"].endswith(f"({row['cores']} cores)") and row["vocab"] == "2048"
        seconds, mb = float(row["seconds"]), float(row["mb"])
        assert seconds > 0 and mb >= 1.0
        assert float(row["mb_per_s"]) == pytest.approx(mb / seconds, rel=1e-2)
        assert float(row["tokens_per_s"]) == pytest.approx(int(row["tokens"]) / seconds, rel=1e-2)
        if name == "ours":
            assert row["ratio"] == "" and row["pass"] == ""
        else:
            assert float(row["ratio"]) == pytest.approx(seconds / float(ours["seconds"]), rel=1e-2)
            assert float(row["target"]) == bench.TARGETS[name]
            assert row["pass"] == ("pass" if float(row["ratio"]) >= bench.TARGETS[name] else "FAIL")
    assert {(r.documents, r.tokens) for r in out["results"].values()} == {
        (int(ours["documents_in"]), int(ours["tokens"]))
    }

    stages = [r for r in rows if r["section"] == "pipeline"]
    names = [r["method"] for r in stages]
    assert names[0] == "ingest" and names[1] == "filter-files" and names[-1] == "pipeline (all stages)"
    assert "dedup-exact-filter" in names and "dedup-minhash-filter" in names
    total = stages[-1]
    assert 0 < int(total["documents_out"]) <= int(total["documents_in"])
    assert 0.5 <= float(total["mb"]) < 0.6 and float(total["mb_out"]) <= float(total["mb"])
    for row in stages:
        if row["mb"]:
            assert float(row["mb_per_s"]) == pytest.approx(float(row["mb"]) / float(row["seconds"]), rel=2e-2)
        if row["mb_out"]:
            assert float(row["mb_out"]) <= float(row["mb"]) + 1e-6
        if row["documents_out"] and row["documents_in"]:
            assert int(row["documents_out"]) <= int(row["documents_in"])
    assert not (tmp_path / "work" / "runs").exists()  # the rounds' outputs are removed


@pytest.mark.slow
def test_token_check_finds_a_changed_document(bench, tmp_path: Path, clean_env: None) -> None:
    info = bench.make_corpus(tmp_path / "corpus", 0.3, seed=3)
    setup = bench.prepare(tmp_path, info, vocab=1024, train_mb=0.3, workers=2, seed=3)
    for method in bench.METHODS:
        bench.run_round(setup, method, 0)
    assert bench.check_tokens(setup) == {"ours": 0, "hf-datasets": 0, "hf-tokenizers": 0}

    shard = sorted(setup.outputs["ours"].glob("train-*.bin"))[0]
    ids = np.fromfile(shard, dtype=setup.dtype)
    assert setup.eos_id not in ids[:4]  # every page has at least 4 words: these are document 0's
    ids[3] = int(ids[3]) + 1 if int(ids[3]) + 1 < setup.vocab else int(ids[3]) - 1
    ids.tofile(shard)
    assert bench.check_tokens(setup) == {"ours": 1, "hf-datasets": 0, "hf-tokenizers": 0}
