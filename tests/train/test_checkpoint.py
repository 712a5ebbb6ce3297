"""A kill during a save never costs the newest good checkpoint: torn and temp files are passed over."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from orchestra.train.checkpoint import CheckpointError, find_resume_checkpoint, load_checkpoint_file
from orchestra.train.run import train
from tests.helpers import tiny_config
from tests.train.test_run import column, read_metrics


def test_torn_and_temp_checkpoints_are_skipped_and_resume_continues(
    corpus_dir: Path, data_cache: Path, trained_run: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    ckpts = run / "checkpoints"
    good = find_resume_checkpoint(run)
    assert good is not None and load_checkpoint_file(good)["global_step"] == 30
    data = (ckpts / "last.ckpt").read_bytes()
    # What a kill mid-save leaves: a half-written file under a final name (a filesystem without
    # atomic rename), and our own temp file of a newer step.
    (ckpts / "step0000040.ckpt").write_bytes(data[: len(data) // 2])
    (ckpts / "step0000050.ckpt.tmp-4242").write_bytes(data)
    (ckpts / "step0000045.ckpt").write_bytes(b"")
    assert find_resume_checkpoint(run) == good
    with pytest.raises(CheckpointError, match=r"step0000040\.ckpt"):
        load_checkpoint_file(ckpts / "step0000040.ckpt")

    result = train(tiny_config(corpus_dir, data_cache, run, max_steps=32))
    assert result.summary["resumed_from"] == str(good) and result.summary["steps"] == 32
    assert sorted(column(read_metrics(run), "train/loss"))[-2:] == [30, 31]
