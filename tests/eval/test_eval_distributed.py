"""orchestra-eval under torchrun: 2 gloo ranks give the single process's metrics and samples."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from orchestra.eval.run import read_results

pytestmark = pytest.mark.slow

TASKS = "[perplexity,classification,generation,lm_eval]"


def _evaluate(folder: Path, corpus_dir: Path, out: Path, nproc: int) -> tuple[dict[str, Any], dict[str, Any]]:
    launcher = [sys.executable, "-m", "orchestra.cli.eval"]
    if nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc_per_node={nproc}", "-m", "orchestra.cli.eval"]  # fmt: skip
    overrides = [
        f"ckpt={folder}",
        f"tasks={TASKS}",
        f"paths=[{corpus_dir / 'glob.py.txt'},{corpus_dir / 'shlex.py.txt'}]",
        "limit=7",  # odd: the ranks get unequal shares
        "max_new_tokens=12",
        "batch_size=3",
        "device=cpu",
        f"out={out}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([*launcher, *overrides], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    return read_results(out)


def test_two_ranks_equal_one_process(exported_folder: Path, corpus_dir: Path, tmp_path: Path) -> None:
    single, single_samples = _evaluate(exported_folder, corpus_dir, tmp_path / "one", 1)
    sharded, sharded_samples = _evaluate(exported_folder, corpus_dir, tmp_path / "two", 2)
    assert not (tmp_path / "two" / "eval.json.tmp").exists()
    assert (
        set(sharded["tasks"])
        == set(single["tasks"])
        == {"perplexity", "classification", "generation", "lm_eval"}
    )
    for task, body in single["tasks"].items():
        got = sharded["tasks"][task]["metrics"]
        assert set(got) == set(body["metrics"]), task
        for metric, value in body["metrics"].items():
            assert got[metric] == pytest.approx(value, rel=1e-5, abs=1e-7), (task, metric)
    for task in ("classification", "generation"):
        # Every example once, in the single process's order, with its own prediction.
        assert [s["example"] for s in sharded_samples[task]] == list(range(7))
        assert [s["example"] for s in single_samples[task]] == list(range(7))
        assert [s.get("prediction") for s in sharded_samples[task]] == [
            s.get("prediction") for s in single_samples[task]
        ]
    assert len(sharded_samples["perplexity"]) == len(single_samples["perplexity"]) == 2
