"""A hard kill between a checkpoint and its metrics row: the resumed run's metrics.csv is still complete."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

from orchestra.train.checkpoint import load_checkpoint_file
from orchestra.train.run import train
from tests.helpers import tiny_config
from tests.train.test_run import column, read_metrics


def test_row_of_the_checkpointed_step_comes_back_from_the_checkpoint(
    corpus_dir: Path, data_cache: Path, tmp_path: Path
) -> None:
    straight = tmp_path / "straight"
    train(
        tiny_config(corpus_dir, data_cache, straight, max_steps=12, ckpt_every_n_steps=6, val_every_n_steps=6)
    )
    ckpt = straight / "checkpoints" / "step0000006.ckpt"
    assert load_checkpoint_file(ckpt)["orchestra"]["last_row"]["step"] == 5

    # The state a node failure leaves: the step-6 checkpoint on disk, metrics.csv written up to
    # step 4 only (the row of step 5 was still pending in Lightning when the node died).
    killed = tmp_path / "killed"
    (killed / "checkpoints").mkdir(parents=True)
    shutil.copy(ckpt, killed / "checkpoints")
    with open(straight / "metrics.csv", newline="") as f:
        reader = csv.DictReader(f)
        rows = [r for r in reader if r["step"] and int(float(r["step"])) <= 4]
        header = reader.fieldnames
    with open(killed / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)

    train(
        tiny_config(corpus_dir, data_cache, killed, max_steps=12, ckpt_every_n_steps=6, val_every_n_steps=6)
    )
    ref, got = column(read_metrics(straight), "train/loss"), column(read_metrics(killed), "train/loss")
    assert sorted(got) == list(range(12))
    assert got == ref
