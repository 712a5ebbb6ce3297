"""The on-disk shard format in one module, the import paths kept for it, and the shared batch plan."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from orchestra.data import dataset, pack, shards
from orchestra.data.datamodule import BatchPlan, TokenDataModule
from orchestra.data.errors import DataError
from orchestra.data.shards import (
    FORMAT_VERSION,
    MANIFEST_FILE,
    ShardWriter,
    load_manifest,
    token_dtype,
    verify_shards,
    write_manifest,
)

# The manifest's fields in file order, as orchestra-prepare has always written them.
MANIFEST_KEYS = [
    "format_version",
    "created",
    "dtype",
    "byte_order",
    "vocab_size",
    "eos_id",
    "eos_token",
    "tokenizer",
    "data_config",
    "fingerprint",
    "corpus",
    "split",
    "splits",
    "total_tokens",
    "documents",
    "prepare_seconds",
]


def write_dataset(root: Path, train: np.ndarray, val: np.ndarray, shard_tokens: int = 16) -> Path:
    """A dataset written through the format's own writer, with made-up provenance."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "tokenizer.json").write_text("{}")
    dtype = token_dtype(300)
    splits = {}
    for split, tokens in (("train", train), ("val", val)):
        writer = ShardWriter(root, split, dtype, shard_tokens)
        writer.write(tokens, documents=1)
        splits[split] = writer.close()
    write_manifest(
        root,
        dtype=dtype,
        vocab_size=300,
        eos_id=0,
        eos_token="<|endoftext|>",
        tokenizer={"trained": True, "source": None},
        splits=splits,
        provenance={"data_config": {}, "fingerprint": {}, "corpus": {}, "split": {}},
        stats={"documents": 2, "prepare_seconds": 0.0},
    )
    return root


def test_written_manifest_reads_back_in_the_old_field_order(tmp_path: Path) -> None:
    root = write_dataset(tmp_path, np.arange(1, 41), np.arange(1, 21))
    manifest = load_manifest(root)
    assert list(json.loads((root / MANIFEST_FILE).read_text())) == MANIFEST_KEYS
    assert manifest["format_version"] == FORMAT_VERSION and manifest["dtype"] == "uint16"
    assert list(manifest["tokenizer"]) == ["file", "sha256", "trained", "source"]
    assert manifest["total_tokens"] == 60 and len(manifest["splits"]["train"]["shards"]) == 3
    verify_shards(root)
    (root / "train-00001.bin").write_bytes(b"\0\0")
    with pytest.raises(DataError, match="truncated or corrupt"):
        verify_shards(root)


def test_old_import_paths_name_the_same_objects() -> None:
    for name in ("FORMAT_VERSION", "MANIFEST_FILE", "SPLITS", "ShardWriter", "token_dtype"):
        assert getattr(pack, name) is getattr(shards, name), name
    for name in ("load_manifest", "verify_shards"):
        assert getattr(dataset, name) is getattr(shards, name), name


def test_task_names_are_importable_from_the_package() -> None:
    import orchestra.data.tasks as tasks

    # Every public name of the former orchestra/data/tasks.py module.
    assert set(tasks.__all__) == {
        "IGNORE_INDEX",
        "ROLES",
        "ClassificationDataset",
        "DPODataset",
        "Messages",
        "SFTDataset",
        "Segments",
        "TaskDataModule",
        "as_messages",
        "collate_classification",
        "collate_dpo",
        "dpo_row",
        "dpo_side",
        "encode_sft",
        "encode_sft_batch",
        "encode_texts",
        "hold_out",
        "read_classification",
        "read_dpo",
        "read_sft",
        "render_chat",
        "resolve_task_paths",
    }
    assert all(hasattr(tasks, name) for name in tasks.__all__) and tasks.IGNORE_INDEX == -100


def test_val_sampler_error_names_the_data_key_only_from_the_data_module(tmp_path: Path) -> None:
    root = write_dataset(tmp_path, np.arange(1, 101), np.arange(1, 11))  # val: 1 window of 8
    dm = TokenDataModule(root, 8, 2, 8, seed=0, max_steps=2, val_batches=2, loader_workers=0)
    with pytest.raises(DataError, match=r"val split has 1 samples, fewer than .*; raise data\.val_fraction"):
        dm.val_dataloader()
    with pytest.raises(DataError) as plain:
        dataset.ValBatchSampler(1, 2, 0, 1, batches=2)
    assert "val_fraction" not in str(plain.value) and "task." not in str(plain.value)


def test_checkpointed_data_state_keeps_its_form(tmp_path: Path) -> None:
    """Checkpoints written before BatchPlan hold the first four keys (skip_steps came with the loss
    guard); they must still load."""
    root = write_dataset(tmp_path, np.arange(1, 101), np.arange(1, 41))
    dm = TokenDataModule(root, 8, 2, 8, seed=3, max_steps=2, val_batches=2, loader_workers=0)
    state = dm.state_dict()
    assert state == {
        "consumed_samples": 0,
        "global_batch_size": 8,
        "seed": 3,
        "accumulation": 4,
        "skip_steps": [],
    }
    dm.load_state_dict({"consumed_samples": 16, "global_batch_size": 8, "seed": 3, "accumulation": 2})
    loader = dm.train_dataloader()
    assert len(loader) == 2 * 4 and loader.state_dict() == state
    assert BatchPlan(8, 2, 8, 3, 2, 2).accumulation(world_size=2) == 2
