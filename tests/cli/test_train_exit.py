"""orchestra-train leaves a failure marker (ORCHESTRA_FAIL_MARKER) for slurm/common.sh exactly when
a requeue could not help: a bad override or config, a diverged loss, a crash; never when done."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import cli_overrides


def run_cli(args: list[str], marker: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ORCHESTRA_FAIL_MARKER": str(marker), "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "orchestra.cli.train", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


@pytest.mark.parametrize(
    ("override", "code"),
    [("trainer.max_stepz=5", 2), ("trainer.max_steps=-1", 2), ("trainer.guard=sometimes", 2)],
)
def test_a_failure_a_requeue_cannot_fix_leaves_the_marker(
    override: str, code: int, corpus_dir: Path, data_cache: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "job.failed"
    proc = run_cli([*cli_overrides(corpus_dir, data_cache, tmp_path / "run"), override], marker)
    assert proc.returncode == code, proc.stderr[-2000:]
    record = json.loads(marker.read_text())
    assert record["exit_code"] == code


def test_a_finished_run_leaves_no_marker(corpus_dir: Path, data_cache: Path, tmp_path: Path) -> None:
    marker = tmp_path / "job.failed"
    args = cli_overrides(corpus_dir, data_cache, tmp_path / "run", **{"trainer.max_steps": 2})
    proc = run_cli(args, marker)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not marker.exists()
