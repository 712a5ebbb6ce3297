"""Checkpoint integrity: every checkpoint carries a sha256 manifest; a changed byte is caught before use."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from unittest import mock

import pytest
import torch

from orchestra.train.callbacks.checkpointing import RunCheckpoint
from orchestra.train.checkpoint import (
    AtomicCheckpointIO,
    CheckpointError,
    consolidated_state_dict,
    load_checkpoint_file,
    scan_checkpoints,
    verify_checkpoint,
    write_manifest,
)
from orchestra.train.checkpoint.manifest import DIR_MANIFEST, manifest_path


def flip_byte(path: Path, offset_from_end: int = 4096) -> None:
    """Change one byte well inside the file (a tensor's data), keeping its size."""
    data = bytearray(path.read_bytes())
    i = max(0, len(data) - offset_from_end)
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_every_checkpoint_of_a_run_has_a_manifest_matching_hashlib(trained_run: Path) -> None:
    ckpts = sorted((trained_run / "checkpoints").glob("*.ckpt"))
    assert {p.name for p in ckpts} >= {"last.ckpt", "step0000030.ckpt"}
    for ckpt in ckpts:
        manifest = json.loads(manifest_path(ckpt).read_text())
        entry = manifest["files"]["."]
        assert entry["bytes"] == ckpt.stat().st_size
        assert entry["sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()  # independent digest
        assert verify_checkpoint(ckpt) is True
    assert not list((trained_run / "checkpoints").glob("last-v*"))


def test_a_flipped_byte_or_truncation_is_refused_by_name_and_resume_falls_back(
    trained_run: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    ckpts = run / "checkpoints"
    newest = scan_checkpoints(run).best
    assert newest is not None and newest.name == "step0000030.ckpt"
    flip_byte(newest)
    with pytest.raises(CheckpointError, match=r"step0000030\.ckpt.*sha256"):
        verify_checkpoint(newest)
    with pytest.raises(CheckpointError, match=r"step0000030\.ckpt"):
        consolidated_state_dict(newest)  # what orchestra-export and orchestra-generate read through
    last = ckpts / "last.ckpt"
    last.write_bytes(last.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"last\.ckpt has \d+ bytes, its manifest says"):
        verify_checkpoint(last)
    scan = scan_checkpoints(run)
    assert scan.best == ckpts / "step0000020.ckpt"
    assert {p.name for p, _ in scan.skipped} == {"step0000030.ckpt", "last.ckpt"}
    assert all("manifest" in reason or "sha256" in reason for _, reason in scan.skipped)


def test_a_checkpoint_without_a_manifest_is_accepted_unverified(trained_run: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "old.ckpt"
    shutil.copy(trained_run / "checkpoints" / "last.ckpt", ckpt)  # as written by an older version
    assert verify_checkpoint(ckpt) is False
    assert load_checkpoint_file(ckpt)["global_step"] == 30


def test_directory_manifest_lists_every_shard(tmp_path: Path) -> None:
    ckpt = tmp_path / "step0000010.ckpt"
    (ckpt / "sub").mkdir(parents=True)
    (ckpt / "__0_0.distcp").write_bytes(b"a" * 1000)
    (ckpt / "sub" / "x").write_bytes(b"b" * 10)
    write_manifest(ckpt)
    assert (ckpt / DIR_MANIFEST).is_file() and verify_checkpoint(ckpt)
    (ckpt / "stray").write_bytes(b"c")
    with pytest.raises(CheckpointError, match="not in its manifest: stray"):
        verify_checkpoint(ckpt)
    (ckpt / "stray").unlink()
    (ckpt / "sub" / "x").unlink()
    with pytest.raises(CheckpointError, match=r"sub/x is missing"):
        verify_checkpoint(ckpt)


def test_a_save_that_fails_leaves_the_previous_checkpoint_and_manifest_intact(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(4)}, "global_step": 1}, path)
    before, manifest_before = path.read_bytes(), manifest_path(path).read_text()

    def disk_full(obj: object, f: object, *args: object, **kwargs: object) -> None:
        f.write(b"partial")  # type: ignore[attr-defined]
        raise OSError(28, "No space left on device")

    with mock.patch("torch.save", disk_full), pytest.raises(CheckpointError, match="No space left on device"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(4)}, "global_step": 2}, path)
    assert path.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    # The previous checkpoint keeps its manifest, and it still verifies.
    assert manifest_path(path).read_text() == manifest_before and verify_checkpoint(path)
    assert load_checkpoint_file(path)["global_step"] == 1


def test_retention_keeps_the_old_checkpoint_while_the_newest_is_not_intact(tmp_path: Path) -> None:
    io = AtomicCheckpointIO()
    old, new = tmp_path / "step0000010.ckpt", tmp_path / "step0000020.ckpt"
    for step, path in ((10, old), (20, new)):
        io.save_checkpoint({"state_dict": {}, "global_step": step}, path)
    callback = RunCheckpoint(dirpath=tmp_path, save_top_k=1, monitor="step", mode="max")
    trainer = mock.MagicMock(is_global_zero=True)
    callback._last_checkpoint_saved = str(new)
    new.write_bytes(new.read_bytes()[:-10])  # the newest is damaged: the old one must stay
    callback._remove_checkpoint(trainer, str(old))
    trainer.strategy.remove_checkpoint.assert_not_called()
    io.save_checkpoint({"state_dict": {}, "global_step": 20}, new)
    callback._remove_checkpoint(trainer, str(old))
    trainer.strategy.remove_checkpoint.assert_called_once_with(str(old))
