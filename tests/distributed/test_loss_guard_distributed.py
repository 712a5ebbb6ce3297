"""The loss guard decides on all ranks together: a NaN on rank 1 alone makes both ranks skip the
step (DDP and FSDP2, 2 gloo processes), and training goes on in lockstep."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed.guard_worker import BAD_STEP

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_nan_on_one_rank_is_skipped_by_every_rank(
    strategy: str, corpus_dir: Path, data_cache: Path, tmp_path: Path
) -> None:
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(root)}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        str(root / "tests" / "distributed" / "guard_worker.py"),
        str(corpus_dir), str(data_cache), str(tmp_path / "run"), strategy,
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=root)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-4000:]
    reports = {r["rank"]: r for r in map(json.loads, re.findall(r"GUARD-REPORT (\{.*?\})", text))}
    assert sorted(reports) == [0, 1], text[-3000:]
    assert reports[1]["fired"] > 0 and reports[0]["fired"] == 0
    for report in reports.values():
        assert report["unchanged_by_bad_step"] and report["changed_by_next_step"], report
    if strategy == "ddp":  # replicas: the same weights on both ranks
        assert reports[0]["final"] == reports[1]["final"]
    record = json.loads((tmp_path / "run" / "guard.json").read_text())
    (event,) = record["events"]
    assert event["step"] == BAD_STEP and "1 of 2 rank(s)" in event["reason"] and event["action"] == "skip"
