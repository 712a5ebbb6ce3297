"""The GPU session off the GPU: bench/gpu_session.sh parses; bench/deepspeed_check.py's commands and checks."""

from __future__ import annotations

import csv
import importlib
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SESSION = ROOT / "bench" / "gpu_session.sh"


@pytest.fixture(scope="module")
def ds():
    return importlib.import_module("bench.deepspeed_check")  # bench/ is a package beside tests/


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_session_script_parses_and_every_stage_is_defined():
    subprocess.run(["bash", "-n", str(SESSION)], check=True, timeout=30)
    text = SESSION.read_text()
    stages = re.findall(r"^run_stage (\S+) \d+ \d+ (\S+)$", text, flags=re.M)
    assert [s for s, _ in stages] == [
        "setup",
        "pretrain",
        "kernels",
        "energy",
        "finetune",
        "scaling",
        "pretrain-debug",
    ]
    for _, fn in [*stages, ("", "stage_kernel_tests"), ("", "stage_ds_zero3"), ("", "stage_ds_zero2")]:
        assert re.search(rf"^{fn}\(\) {{", text, flags=re.M), fn
    # Every bench script it calls exists.
    for script in set(re.findall(r"bench/\w+\.py", text)) - {"bench/x.py"}:  # x.py: a comment
        assert (ROOT / script).is_file(), script


def test_deepspeed_runs_compose_and_validate(ds, tmp_path):
    for strategy in ("deepspeed_zero2", "deepspeed_zero3"):
        overrides = ds.train_overrides(strategy, "debug", 40, tmp_path / strategy)
        cfg = ds.compose_check([*overrides, "resume=auto"])
        assert cfg.strategy.name.value == strategy
        assert (cfg.trainer.max_steps, cfg.trainer.ckpt_every_n_steps, cfg.resume) == (40, 20, "auto")
    with pytest.raises(ValueError, match="even"):
        ds.train_overrides("deepspeed_zero2", "debug", 41, tmp_path)


def test_resumed_losses_are_compared_from_the_resume_step(ds):
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


def test_cut_metrics_keeps_only_rows_before_the_resume_step(ds, tmp_path):
    path = tmp_path / "metrics.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["step", "train/loss", "val/loss"])
        writer.writeheader()
        writer.writerows(
            [{"step": s, "train/loss": 8 - s / 10} for s in (1, 19, 21, 39)] + [{"step": 39, "val/loss": 6}]
        )
    assert ds.cut_metrics(path, 20) == 2
    assert ds.read_losses(path) == {1: pytest.approx(7.9), 19: pytest.approx(6.1)}
