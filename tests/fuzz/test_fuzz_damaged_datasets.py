"""Damaged prepared datasets: a copy of a good one has a shard, the tokenizer or manifest.json
truncated, flipped, appended to, replaced, deleted, or (manifest) edited field by field, then is
loaded with verification (``PackedDataset(verify=True)`` for both splits).

Property: one DataError naming the damaged file (for the manifest: it, or the file its changed
entry points at), or a correct result -- the same token streams and the same vocab_size / eos_id
as the intact dataset. Never another exception, and the intact dataset is never touched.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from orchestra.config import DataConfig
from orchestra.data.dataset import PackedDataset, load_manifest
from orchestra.data.errors import DataError
from orchestra.data.pack import prepare_dataset
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


SEQ_LEN = 16


@pytest.fixture(scope="module")
def sharded(data_config: DataConfig, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fuzz corpus prepared with small shards: several per split."""
    cfg = replace(
        data_config,
        name="fuzz-sharded",
        shard_tokens=6000,
        cache_dir=str(tmp_path_factory.mktemp("sharded")),
    )
    dataset = prepare_dataset(cfg, seed=0)
    manifest = load_manifest(dataset)
    assert len(manifest["splits"]["train"]["shards"]) >= 3, manifest["splits"]["train"]
    return dataset


def read_back(dataset_dir: Path) -> tuple[dict[str, np.ndarray], int, int]:
    """Every split's whole token stream through verified PackedDatasets, plus vocab_size and eos_id."""
    streams = {}
    for split in ("train", "val"):
        dataset = PackedDataset(dataset_dir, split, SEQ_LEN, verify=True)
        streams[split] = dataset.tokens(0, dataset.total_tokens)
        assert len(dataset) >= 1 and tuple(dataset[len(dataset) - 1][1].shape) == (SEQ_LEN,)
    manifest = load_manifest(dataset_dir)
    return streams, int(manifest["vocab_size"]), int(manifest["eos_id"])


json_values = st.recursive(
    st.one_of(
        st.none(), st.booleans(), st.integers(-5, 70_000), st.floats(allow_nan=False), st.text(max_size=12)
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key path in a JSON tree (dict keys and list indices), the root excluded."""
    out: list[tuple[Any, ...]] = []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    for key, child in items:
        out.append((*prefix, key))
        out.extend(_paths(child, (*prefix, key)))
    return out


def edit_manifest(raw: bytes, data: st.DataObject) -> bytes:
    """One structural edit of manifest.json: a key deleted or renamed, or a value replaced."""
    manifest = json.loads(raw)
    path = data.draw(st.sampled_from(sorted(_paths(manifest), key=repr)))
    parent = manifest
    for key in path[:-1]:
        parent = parent[key]
    how = data.draw(st.sampled_from(["delete", "rename", "replace", "nudge"]))
    event(f"manifest edit: {how} {'.'.join(str(k) for k in path[:2])}")
    last = path[-1]
    if how == "delete":
        del parent[last]
    elif how == "rename" and isinstance(parent, dict):
        parent[last + "_"] = parent.pop(last)
    elif how == "nudge" and isinstance(parent[last], int) and not isinstance(parent[last], bool):
        parent[last] += data.draw(st.sampled_from([-1, 1, 1000]))
    else:
        parent[last] = data.draw(json_values)
    return json.dumps(manifest, indent=2).encode()


@settings(FUZZ, max_examples=300)
@given(
    how=st.sampled_from(["truncate", "flip", "append", "delete", "replace", "edit"]),
    which=st.integers(0, 1000),
    where=st.floats(0.0, 1.0),
    masks=st.lists(st.integers(1, 255), min_size=1, max_size=3),
    data=st.data(),
)
def test_a_damaged_dataset_is_refused_naming_the_file_or_reads_the_same(
    how: str, which: int, where: float, masks: list[int], data: st.DataObject, sharded: Path
) -> None:
    """Load a damaged copy: DataError naming the damaged file, or exactly the intact tokens/vocab/EOS."""
    before = tree_digest(sharded)
    intact_streams, intact_vocab, intact_eos = read_back(sharded)
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / sharded.name
        shutil.copytree(sharded, copy)
        files = sorted(p for p in copy.iterdir() if p.is_file())
        target = files[which % len(files)] if how != "edit" else copy / "manifest.json"
        event(f"{how} {target.name.split('-')[0]}")
        raw = target.read_bytes()
        at = min(int(where * len(raw)), len(raw))
        if how == "truncate":
            target.write_bytes(raw[:at])
        elif how == "flip":
            damaged = raw
            for i, mask in enumerate(masks):
                damaged = flip(damaged, (where + i * 0.37) % 1.0, mask)
            target.write_bytes(damaged)
        elif how == "append":
            target.write_bytes(raw + data.draw(st.binary(min_size=1, max_size=16)))
        elif how == "delete":
            target.unlink()
        elif how == "replace":
            target.write_bytes(data.draw(st.binary(max_size=64)))
        else:
            target.write_bytes(edit_manifest(raw, data))

        try:
            streams, vocab, eos = read_back(copy)
        except DataError as err:
            message = str(err)
            named = [str(target)]
            if target.name == "manifest.json":  # a changed entry is reported at the file it describes
                named += [str(p) for p in files]
            assert any(n in message for n in named), (how, target.name, message)
        else:
            assert (vocab, eos) == (intact_vocab, intact_eos), (how, target.name, "read a changed vocab/EOS")
            for split, tokens in intact_streams.items():
                assert np.array_equal(streams[split], tokens), (how, target.name, f"{split} tokens changed")
    assert tree_digest(sharded) == before


def _manifest_bytes_edit(change: Any) -> Any:
    def apply(manifest_path: Path) -> None:
        manifest = json.loads(manifest_path.read_text())
        change(manifest)
        manifest_path.write_text(json.dumps(manifest))

    return apply


# Minimal reproducers of what the fuzzing found (a fuzz run stops at its first failure).
KNOWN = {
    "invalid-utf8": lambda p: p.write_bytes(p.read_bytes().replace(b'"created"', b'"cr\xffated"')),
    "unknown-dtype": _manifest_bytes_edit(lambda m: m.update(dtype="uint36")),
    "split-not-a-dict": _manifest_bytes_edit(lambda m: m.update(splits=5)),
    "shards-key-missing": _manifest_bytes_edit(lambda m: m["splits"]["train"].pop("shards")),
    "shard-entry-without-tokens": _manifest_bytes_edit(
        lambda m: m["splits"]["train"]["shards"][0].pop("tokens")
    ),
    "tokenizer-entry-not-a-dict": _manifest_bytes_edit(lambda m: m.update(tokenizer="tokenizer.json")),
    "vocab-size-changed": _manifest_bytes_edit(lambda m: m.update(vocab_size=m["vocab_size"] - 100)),
}


@pytest.mark.parametrize("name", sorted(KNOWN))
def test_known_manifest_damage_is_refused_naming_it(name: str, sharded: Path, tmp_path: Path) -> None:
    """Each reproducer: a DataError naming manifest.json (or the shard it describes), or the intact data."""
    copy = tmp_path / "dataset"
    shutil.copytree(sharded, copy)
    KNOWN[name](copy / "manifest.json")
    intact = read_back(sharded)
    try:
        streams, vocab, eos = read_back(copy)
    except DataError as err:
        assert str(copy) in str(err), str(err)
    else:
        assert (vocab, eos) == intact[1:], f"read vocab_size={vocab}, eos_id={eos}; intact: {intact[1:]}"
        for split, tokens in intact[0].items():
            assert np.array_equal(streams[split], tokens), f"{split} tokens changed"
