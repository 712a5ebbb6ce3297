"""No hangs at the end of a run: 2-rank DDP and FSDP jobs run fit -> final validation -> sample
20 times each without one (a hang fails on the timeout, it does not stall the suite)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROUNDS = 20


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_end_of_run_path_never_hangs(
    strategy: str, corpus_dir: Path, data_cache: Path, tmp_path: Path
) -> None:
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(root)}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        str(root / "tests" / "distributed" / "stress_worker.py"),
        str(corpus_dir), str(data_cache), str(tmp_path), strategy, str(ROUNDS),
    ]  # fmt: skip
    log = tmp_path / "log"
    with open(log, "wb") as out:
        try:
            proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=300, cwd=root)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{strategy}: a round hung:\n{log.read_text()[-4000:]}")
    text = log.read_text()
    assert proc.returncode == 0, text[-4000:]
    # One report per rank (the two ranks' lines may interleave in the shared log).
    reports = [json.loads(m) for m in re.findall(r'\{"rounds": \d+, "max_s": [\d.e-]+\}', text)]
    assert len(reports) == 2 and all(r["rounds"] == ROUNDS for r in reports), text[-2000:]
    assert len(list(tmp_path.glob("round*/summary.json"))) == ROUNDS
