"""Context parallelism (strategy.cp) on 2 CPU gloo ranks.

The split itself (context_parallel_worker.py): each rank's blocks see half of every row, in the
load-balanced order, and the averaged gradients equal one process's on the whole rows, with and
without recomputation and with uneven targets per share. Then whole runs: CP=2 and FSDP x CP
= 2 x 2 give the single-process losses step for step and resume under another layout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed.test_strategies import STEPS, job, losses, run

pytestmark = pytest.mark.slow
WORKER = Path(__file__).with_name("context_parallel_worker.py")


@pytest.mark.parametrize(("checkpointing", "ignore"), [("none", "none"), ("full", "uneven")])
def test_split_step_equals_whole_rows(tmp_path: Path, checkpointing: str, ignore: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2])}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(WORKER),
            str(tmp_path),
            checkpointing,
            ignore,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    # 24 positions in 4 chunks of 6: rank 0 holds the first and last, rank 1 the middle two.
    assert ranks[0]["positions"] == [*range(0, 6), *range(18, 24)]
    assert ranks[1]["positions"] == [*range(6, 12), *range(12, 18)]
    for r in ranks:
        assert r["block_tokens"] == 12
        assert r["loss"] == pytest.approx(r["reference"], rel=1e-6)
        assert r["max_grad_diff"] < 1e-6
        assert r["plain_after"]  # outside a step the layers attend as before


@pytest.fixture(scope="module")
def runs(corpus_dir: Path, data_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cp")
    out = {}
    layouts: dict[str, tuple[int, str, dict[str, object]]] = {
        "single": (1, "single", {}),
        "cp2": (2, "fsdp", {"strategy.cp": 2}),
        "fsdp2xcp2-ac": (4, "fsdp", {"strategy.cp": 2, "strategy.activation_checkpointing": "full"}),
    }
    for name, (world, strategy, extra) in layouts.items():
        run_dir = root / name / "run"
        run(job(corpus_dir, data_cache, run_dir, world, strategy, **extra), world, root / f"{name}.log")
        out[name] = run_dir
    return out


@pytest.mark.parametrize("layout", ["cp2", "fsdp2xcp2-ac"])
def test_context_parallel_matches_one_process(runs: dict[str, Path], layout: str) -> None:
    ref, got = losses(runs["single"]), losses(runs[layout])
    assert sorted(got) == sorted(ref) == list(range(STEPS))
    assert got == pytest.approx(ref, rel=1e-5, abs=1e-6)
    assert losses(runs[layout], "val/loss") == pytest.approx(losses(runs["single"], "val/loss"), rel=1e-5)


def test_context_parallel_checkpoint_resumes_in_one_process(
    runs: dict[str, Path], corpus_dir: Path, data_cache: Path, tmp_path: Path
) -> None:
    ckpt = runs["cp2"] / "checkpoints" / "step0000005.ckpt"
    run_dir = tmp_path / "resumed"
    run(job(corpus_dir, data_cache, run_dir, 1, "fsdp", resume=ckpt), 1, tmp_path / "log")
    ref, got = losses(runs["single"]), losses(run_dir)
    assert sorted(got) == list(range(5, STEPS))
    assert got == pytest.approx({s: ref[s] for s in got}, rel=1e-5, abs=1e-6)
