"""Preemption without Slurm: a warning signal that lands in the middle of a checkpoint save.

The handler only sets a flag, so the save in progress completes atomically; the ranks then agree
at the next step boundary, write a preemption checkpoint and stop with the requeue status. Every
checkpoint on disk loads, and resuming from the newest one continues the uninterrupted run.
"""

from __future__ import annotations

import csv
import os
import signal
from pathlib import Path

import pytest

from orchestra.train.callbacks.preemption import MARKER_NAME, PREEMPTED_EXIT_CODE, parse_signal
from orchestra.train.checkpoint import AtomicCheckpointIO, find_resume_checkpoint, load_checkpoint_file
from orchestra.train.run import train
from tests.helpers import tiny_config


def losses(run_dir: Path) -> dict[int, str]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return {int(r["step"]): r["train/loss"] for r in csv.DictReader(f) if r.get("train/loss")}


@pytest.mark.slow
def test_signal_during_a_save_leaves_loadable_checkpoints_and_resume_matches(
    corpus_dir: Path, data_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference = tmp_path / "reference"
    train(tiny_config(corpus_dir, data_cache, reference, max_steps=20, ckpt_every_n_steps=5))

    real_save = AtomicCheckpointIO.save_checkpoint
    calls: dict[str, int] = {"n": 0, "signalled_at": -1}

    def save_then_signal(self, checkpoint, path, storage_options=None):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 2:  # the second file of the step-5 save: USR1 arrives while it is written
            calls["signalled_at"] = checkpoint["global_step"]
            os.kill(os.getpid(), signal.SIGUSR1)
        return real_save(self, checkpoint, path, storage_options)

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", save_then_signal)
    run_dir = tmp_path / "preempted"
    cfg = tiny_config(corpus_dir, data_cache, run_dir, max_steps=20, ckpt_every_n_steps=5)
    with pytest.raises(SystemExit) as stop:
        train(cfg)
    assert stop.value.code == PREEMPTED_EXIT_CODE
    assert (run_dir / MARKER_NAME).is_file()
    ckpts = sorted((run_dir / "checkpoints").glob("*.ckpt"))
    assert ckpts and not list((run_dir / "checkpoints").glob("*.tmp-*"))
    for path in ckpts:
        load_checkpoint_file(path)  # every file is complete
    newest = find_resume_checkpoint(run_dir)
    # The interrupted save completed; the preemption checkpoint is the very next step.
    assert calls["signalled_at"] == 5
    assert newest is not None and load_checkpoint_file(newest)["global_step"] == 6

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", real_save)
    train(cfg)  # the "requeued" job: resume=auto in the same run dir
    assert losses(run_dir) == losses(reference)


def test_signal_names_are_parsed_or_refused() -> None:
    assert parse_signal("USR1") == parse_signal("SIGUSR1") == signal.SIGUSR1
    with pytest.raises(ValueError, match="USR2"):
        parse_signal("USR9")
