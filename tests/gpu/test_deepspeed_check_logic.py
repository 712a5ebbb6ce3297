"""tests/gpu/deepspeed_check.py off the GPU: its commands compose, and its comparisons catch drift."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from tests.gpu import deepspeed_check as ds


def test_deepspeed_runs_compose_and_validate(corpus_overrides: list[str], tmp_path: Path) -> None:
    for strategy in ("deepspeed_zero2", "deepspeed_zero3"):
        for extra in ([], corpus_overrides):  # the session script's command, then the GPU tests'
            overrides = ds.train_overrides(strategy, "debug", 40, tmp_path / strategy, extra)
            cfg = ds.compose_check([*overrides, "resume=auto"])
            assert cfg.strategy.name.value == strategy
            assert (cfg.trainer.max_steps, cfg.trainer.ckpt_every_n_steps, cfg.resume) == (40, 20, "auto")
    with pytest.raises(ValueError, match="even"):
        ds.train_overrides("deepspeed_zero2", "debug", 41, tmp_path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is what a CPU machine sees")
def test_without_cuda_it_refuses_before_running_anything(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        ds.main(["--strategies", "deepspeed_zero2", "--steps", "8", "--out", str(out)])
    assert not out.exists()


def test_resumed_losses_are_compared_from_the_resume_step() -> None:
    reference = {1: 8.0, 19: 7.0, 21: 6.9, 23: 6.8, 25: 6.7}
    same = ds.compare_losses(reference, {21: 6.9, 23: 6.8, 25: 6.7}, 20)
    assert (same.steps, same.first_step, same.max_diff, same.missing) == (3, 21, 0.0, [])
    assert same.ok(tol=0.05, tol_first=0.01)
    drift = ds.compare_losses(reference, {21: 6.905, 23: 6.83, 25: 6.76}, 20)
    assert drift.first_diff == pytest.approx(0.005) and drift.max_diff == pytest.approx(0.06)
    assert not drift.ok(tol=0.05, tol_first=0.01) and drift.ok(tol=0.1, tol_first=0.01)
    jump = ds.compare_losses(reference, {21: 7.2, 23: 6.8, 25: 6.7}, 20)  # e.g. optimizer state lost
    assert not jump.ok(tol=0.5, tol_first=0.01)
    missing = ds.compare_losses(reference, {21: 6.9}, 20)  # the resumed run stopped early
    assert missing.missing == [23, 25] and not missing.ok(tol=1.0, tol_first=1.0)
    assert not ds.compare_losses(reference, {}, 20).ok(tol=1.0, tol_first=1.0)


def test_cut_metrics_keeps_only_rows_before_the_resume_step(tmp_path: Path) -> None:
    path = tmp_path / "metrics.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["step", "train/loss", "val/loss"])
        writer.writeheader()
        writer.writerows(
            [{"step": s, "train/loss": 8 - s / 10} for s in (1, 19, 21, 39)] + [{"step": 39, "val/loss": 6}]
        )
    assert ds.cut_metrics(path, 20) == 2
    assert ds.read_losses(path) == {1: pytest.approx(7.9), 19: pytest.approx(6.1)}
