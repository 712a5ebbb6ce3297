"""Mixtures: the plan against a direct count, and prepared shards decoded back to their documents
to check every source got the share of training tokens it asked for."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from orchestra.config import (
    CleanConfig,
    ConfigError,
    DataConfig,
    DataSource,
    DedupConfig,
    PipelineConfig,
    SourceSpec,
)
from orchestra.data.errors import DataError
from orchestra.data.mixture import plan, targets
from orchestra.data.pack import prepare_dataset
from orchestra.data.shards import load_manifest, verify_shards
from orchestra.data.tokenizer import read_tokenizer_file


def test_targets_split_the_weighted_pool_and_scale_epochs() -> None:
    sources = [SourceSpec("a", ["x"], weight=3.0), SourceSpec("b", ["x"], weight=1.0),
               SourceSpec("c", ["x"], epochs=2.5), SourceSpec("d", ["x"])]  # fmt: skip
    natural = {"a": 100, "b": 700, "c": 40, "d": 13}
    assert targets(sources, natural) == {"a": 600, "b": 200, "c": 100, "d": 13}


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_plan_meets_each_target_within_one_document(seed: int) -> None:
    rng = random.Random(seed)
    names = ["web", "books", "code"]
    doc_sources = [rng.choice(names) for _ in range(300)]
    doc_tokens = [rng.randint(5, 400) for _ in doc_sources]
    sources = [SourceSpec("web", ["x"], weight=0.2), SourceSpec("books", ["x"], weight=0.8),
               SourceSpec("code", ["x"], epochs=0.4)]  # fmt: skip
    copies, shares = plan(sources, doc_sources, doc_tokens, seed)
    natural = {n: sum(t for s, t in zip(doc_sources, doc_tokens, strict=True) if s == n) for n in names}
    pool = natural["web"] + natural["books"]
    want = {"web": round(pool * 0.2), "books": round(pool * 0.8), "code": round(natural["code"] * 0.4)}
    for name in names:
        written = sum(t * c for s, t, c in zip(doc_sources, doc_tokens, copies, strict=True) if s == name)
        assert shares[name].tokens == written
        assert want[name] <= written < want[name] + max(doc_tokens), (name, written, want[name])
    assert copies == plan(sources, doc_sources, doc_tokens, seed)[0]  # deterministic


def test_a_weighted_source_with_nothing_left_is_an_error() -> None:
    sources = [SourceSpec("a", ["x"], weight=1.0), SourceSpec("b", ["x"], weight=1.0)]
    with pytest.raises(DataError, match=r"b has a weight but no training document"):
        plan(sources, ["a", "a"], [5, 5], 0)


def test_weight_and_epochs_together_are_refused() -> None:
    cfg = PipelineConfig(enabled=True, sources=[SourceSpec("a", ["x"], weight=1.0, epochs=2.0)])
    with pytest.raises(ConfigError, match=r"sources\[0\].*weight or epochs"):
        cfg.validate()


LINES = ["the quick brown fox jumps over the lazy dog", "a stitch in time saves nine",
         "all that glitters is not gold", "the early bird catches the worm"]  # fmt: skip


def _source(folder: Path, name: str, n: int, seed: int) -> Path:
    rng = random.Random(seed)
    path = folder / f"{name}.jsonl"
    with path.open("w") as fh:
        for i in range(n):
            body = " ".join(rng.choice(LINES) for _ in range(rng.randint(3, 12)))
            fh.write(json.dumps({"text": f"{name} document {i}: {body}."}) + "\n")
    return path


def _prepare(tmp_path: Path, sources: list[SourceSpec], name: str) -> Path:
    pipeline = PipelineConfig(enabled=True, sources=sources, clean=CleanConfig(min_chars=0),
                              dedup=DedupConfig(exact=False), tasks=1, workers=1)  # fmt: skip
    cfg = DataConfig(name=name, source=DataSource.files, cache_dir=str(tmp_path / "data"), vocab_size=400,
                     val_fraction=0.1, pipeline=pipeline)  # fmt: skip
    return prepare_dataset(cfg, seed=3)


def _decoded_documents(dataset: Path, split: str) -> list[str]:
    manifest = load_manifest(dataset)
    dtype = np.dtype(manifest["dtype"])
    ids = np.concatenate(
        [np.fromfile(dataset / s["file"], dtype=dtype) for s in manifest["splits"][split]["shards"]]
    )
    tokenizer = read_tokenizer_file(dataset / "tokenizer.json")
    cuts = np.flatnonzero(ids == manifest["eos_id"])
    docs, start = [], 0
    for cut in cuts:
        docs.append(tokenizer.decode(ids[start:cut].tolist()))
        start = int(cut) + 1
    return docs


@pytest.mark.slow
def test_prepared_mixture_gives_each_source_its_share(tmp_path: Path) -> None:
    natural = _prepare(tmp_path, [SourceSpec("web", [str(_source(tmp_path, "web", 60, 1))]),
                                  SourceSpec("books", [str(_source(tmp_path, "books", 20, 2))])], "natural")  # fmt: skip
    sources = [SourceSpec("web", [str(tmp_path / "web.jsonl")], weight=1.0),
               SourceSpec("books", [str(tmp_path / "books.jsonl")], weight=3.0)]  # fmt: skip
    mixed = _prepare(tmp_path, sources, "mixed")
    verify_shards(mixed)
    record = load_manifest(mixed)["pipeline"]["mixture"]
    unmixed = load_manifest(natural)["pipeline"]
    pool = record["web"]["natural_tokens"] + record["books"]["natural_tokens"]
    assert record["books"]["target_tokens"] == round(pool * 0.75)
    assert (
        abs(record["books"]["share"] - 0.75) < 0.05
        and record["books"]["factor"] > 1 > record["web"]["factor"]
    )

    # Decoded, the training documents are copies of the natural ones, in the planned numbers.
    train = _decoded_documents(mixed, "train")
    by_source = {"web": 0, "books": 0}
    for doc in train:
        by_source[doc.split(" ", 1)[0]] += 1
    assert by_source == {"web": record["web"]["copies"], "books": record["books"]["copies"]}
    natural_train = set(_decoded_documents(natural, "train"))
    assert set(train) <= natural_train  # nothing invented, no validation document leaked in
    assert set(_decoded_documents(mixed, "val")).isdisjoint(train)
    assert set(_decoded_documents(mixed, "val")) == set(_decoded_documents(natural, "val"))
    assert unmixed.get("mixture") is None
    assert not list(mixed.glob("unmixed-*.bin"))
    assert "| books | weight 3.0 |" in (mixed / "datacard.md").read_text()
    manifest = load_manifest(mixed)
    assert sum(manifest["pipeline"]["tokens_by_source"].values()) == sum(
        s["tokens"] for s in manifest["splits"].values()
    )


@pytest.mark.slow
def test_epochs_repeat_a_source_exactly(tmp_path: Path) -> None:
    sources = [SourceSpec("web", [str(_source(tmp_path, "web", 40, 4))]),
               SourceSpec("books", [str(_source(tmp_path, "books", 20, 5))], epochs=2.0)]  # fmt: skip
    record = load_manifest(_prepare(tmp_path, sources, "epochs"))["pipeline"]["mixture"]
    assert record["books"]["tokens"] == 2 * record["books"]["natural_tokens"]
    assert record["books"]["copies"] == 2 * record["books"]["documents"]
    assert record["web"]["tokens"] == record["web"]["natural_tokens"] and record["web"]["factor"] == 1.0
