"""End-to-end training on CPU: loss falls, summary is complete, a SIGKILLed run resumes exactly."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from orchestra.train.checkpoint import find_resume_checkpoint, load_checkpoint_file
from orchestra.train.run import train
from tests.helpers import cli_overrides, tiny_config

SUMMARY_KEYS = {
    "steps",
    "tokens",
    "train_loss",
    "val_loss",
    "val_ppl",
    "tokens_per_s",
    "mfu",
    "energy_kwh",
    "co2_kg",
    "j_per_token",
    "checkpoint",
}


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def column(rows: list[dict[str, str]], key: str) -> dict[int, str]:
    return {int(r["step"]): r[key] for r in rows if r.get(key)}


@pytest.mark.slow
def test_thirty_steps_val_loss_falls_and_summary_is_complete(
    corpus_dir: Path, data_cache: Path, tmp_path: Path
) -> None:
    cfg = tiny_config(corpus_dir, data_cache, tmp_path / "run")
    cfg.energy.enabled = True
    cfg.energy.measure_power_secs = 1.0
    result = train(cfg)

    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary == result.summary
    assert summary.keys() >= SUMMARY_KEYS
    assert summary["steps"] == 30
    assert summary["tokens"] == 30 * 8 * 64
    assert summary["tokens_per_s"] > 0
    assert summary["mfu"] is None  # CPU: no peak FLOP/s known, so no invented MFU
    assert summary["energy_kwh"] > 0 and summary["co2_kg"] > 0 and summary["j_per_token"] > 0
    assert Path(summary["checkpoint"]).is_file()
    assert list((tmp_path / "run" / "emissions").glob("emissions*.csv"))

    val = column(read_metrics(tmp_path / "run"), "val/loss")
    # Lightning logs a metric at the 0-based index of the step that produced it.
    assert sorted(val) == [9, 19, 29], val
    losses = [float(val[s]) for s in sorted(val)]
    initial = math.log(512)  # uniform prediction over the tokenizer's vocabulary
    assert losses[-1] < losses[0] - 0.1, losses
    assert losses[-1] < initial - 0.5, losses
    assert summary["val_loss"] == pytest.approx(losses[-1], rel=1e-5)
    assert summary["val_ppl"] == pytest.approx(torch.tensor(losses[-1]).exp().item(), rel=1e-4)
    assert result.sample  # a generated continuation was decoded


def logged_steps(run_dir: Path) -> int:
    """Newest step with a train/loss row, tolerating a row being written right now."""
    try:
        return max(column(read_metrics(run_dir), "train/loss"), default=-1)
    except (FileNotFoundError, ValueError, TypeError):
        return -1


def launch(overrides: list[str], log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "orchestra.cli.train", *overrides],
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
        env=env,
    )


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_matches_uninterrupted_run(
    corpus_dir: Path, data_cache: Path, tmp_path: Path
) -> None:
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    ref = launch(cli_overrides(corpus_dir, data_cache, straight), tmp_path / "straight.log")
    assert ref.wait(timeout=300) == 0, (tmp_path / "straight.log").read_text()

    proc = launch(cli_overrides(corpus_dir, data_cache, killed), tmp_path / "killed-1.log")
    deadline = time.time() + 240
    # Kill once step 16's row is in metrics.csv: the step-15 checkpoint exists (it is written
    # before that step's row) and training has moved past it.
    while time.time() < deadline:
        if logged_steps(killed) >= 15:
            break
        if proc.poll() is not None:
            pytest.fail("run finished before it could be killed:\n" + (tmp_path / "killed-1.log").read_text())
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    newest = find_resume_checkpoint(killed)
    assert newest is not None
    killed_at = int(load_checkpoint_file(newest)["global_step"])
    assert 15 <= killed_at < 30

    again = launch(cli_overrides(corpus_dir, data_cache, killed), tmp_path / "killed-2.log")
    assert again.wait(timeout=300) == 0, (tmp_path / "killed-2.log").read_text()
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["resumed_from"] is not None and summary["steps"] == 30

    ref_rows, res_rows = read_metrics(straight), read_metrics(killed)
    ref_loss, res_loss = column(ref_rows, "train/loss"), column(res_rows, "train/loss")
    assert sorted(ref_loss) == sorted(res_loss) == list(range(len(ref_loss)))
    # Bitwise on CPU: same data order, optimizer state, schedule.
    assert res_loss == ref_loss
    assert column(res_rows, "val/loss") == column(ref_rows, "val/loss")


def test_bad_resume_path_is_named(corpus_dir: Path, data_cache: Path, tmp_path: Path) -> None:
    from orchestra.train.checkpoint import CheckpointError

    bogus = tmp_path / "bogus.ckpt"
    bogus.write_bytes(b"not a checkpoint")
    cfg = tiny_config(corpus_dir, data_cache, tmp_path / "run")
    cfg.resume = str(bogus)
    with pytest.raises(CheckpointError, match=r"bogus\.ckpt"):
        train(cfg)
    assert bogus.read_bytes() == b"not a checkpoint"


def test_final_step_is_checkpointed_when_not_a_validation_step(
    corpus_dir: Path, data_cache: Path, tmp_path: Path
) -> None:
    from orchestra.train.checkpoint import checkpoint_step

    cfg = tiny_config(
        corpus_dir, data_cache, tmp_path / "run", max_steps=7, ckpt_every_n_steps=2, val_every_n_steps=5
    )
    summary = train(cfg).summary
    newest = find_resume_checkpoint(tmp_path / "run")
    assert newest is not None and checkpoint_step(newest) == 7
    assert checkpoint_step(Path(summary["checkpoint"])) == 7
