"""strategy.async_checkpoint (DCP async_save) on 2 CPU gloo ranks.

The run trains exactly as with synchronous saves, its checkpoints appear whole with their
manifests (retention and last.ckpt included), and a kill while one is being written leaves
only a temp directory: resume=auto takes the previous checkpoint and the resumed run continues
as the uninterrupted one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.distributed.test_strategies import STEPS, job, losses, run

pytestmark = pytest.mark.slow
KILL_WORKER = Path(__file__).with_name("async_kill_worker.py")
ASYNC = {
    "strategy.async_checkpoint": True,
    "trainer.ckpt_every_n_steps": 2,
    "trainer.keep_last_checkpoints": 2,
}


@pytest.fixture(scope="module")
def reference(corpus_dir: Path, data_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("single") / "run"
    run(job(corpus_dir, data_cache, run_dir, 1, "single"), 1, run_dir.parent / "log")
    return run_dir


def test_async_saves_train_the_same_and_publish_whole_checkpoints(
    reference: Path, corpus_dir: Path, data_cache: Path, tmp_path: Path
) -> None:
    import json

    from orchestra.train.checkpoint.io import checkpoint_step
    from orchestra.train.checkpoint.manifest import verify_checkpoint

    run_dir = tmp_path / "run"
    run(job(corpus_dir, data_cache, run_dir, 2, "fsdp", **ASYNC), 2, tmp_path / "log")
    assert losses(run_dir) == pytest.approx(losses(reference), rel=1e-5, abs=1e-6)
    ckpts = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt", "step0000008.ckpt", "step0000010.ckpt"]
    for path in ckpts.iterdir():
        verify_checkpoint(path)  # every file matches its manifest
    assert checkpoint_step(ckpts / "last.ckpt") == STEPS
    # last.ckpt is the newest step's files, linked, not written a second time.
    shard = next((ckpts / "step0000010.ckpt").glob("*.distcp"))
    assert os.path.samefile(shard, ckpts / "last.ckpt" / shard.name)
    stall = json.loads((run_dir / "summary.json").read_text())["checkpoint_stall_s"]
    assert stall is not None and stall > 0
    # It resumes like any sharded checkpoint (here without async saves, in one process).
    resumed = tmp_path / "resumed"
    run(
        job(corpus_dir, data_cache, resumed, 1, "fsdp", resume=ckpts / "step0000008.ckpt"),
        1,
        tmp_path / "log2",
    )
    ref = losses(reference)
    assert losses(resumed) == pytest.approx({s: ref[s] for s in range(8, STEPS)}, rel=1e-5, abs=1e-6)


def test_a_kill_during_an_async_save_leaves_nothing_resume_takes(
    reference: Path, corpus_dir: Path, data_cache: Path, tmp_path: Path
) -> None:
    from orchestra.train.checkpoint.io import find_resume_checkpoint

    run_dir = tmp_path / "run"
    marker = tmp_path / "stalled"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(Path(__file__).parents[2]),
        "ORCHESTRA_TEST_STALL_STEP": "6",
        "ORCHESTRA_TEST_MARKER": str(marker),
    }
    overrides = job(
        corpus_dir, data_cache, run_dir, 2, "fsdp", **{**ASYNC, "trainer.keep_last_checkpoints": 5}
    )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(KILL_WORKER),
    ]
    with open(tmp_path / "log", "wb") as log:
        proc = subprocess.Popen(
            [*cmd, *overrides], stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        deadline = time.monotonic() + 300
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert marker.exists(), (tmp_path / "log").read_text()[-3000:]
        time.sleep(1.0)  # training goes on while the writer is stuck
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    ckpts = run_dir / "checkpoints"
    names = sorted(p.name for p in ckpts.iterdir())
    assert "step0000006.ckpt" not in names
    assert any(name.startswith("step0000006.ckpt.tmp-") for name in names), names
    best = find_resume_checkpoint(run_dir)
    assert best is not None and best.name in ("step0000004.ckpt", "last.ckpt")
    from orchestra.train.checkpoint.io import checkpoint_step

    assert checkpoint_step(best) == 4
    # resume=auto continues from step 4 exactly as the uninterrupted run (without the stall),
    # keeping 2 checkpoints where the killed run kept 5 (retention's state is adapted, not a crash).
    run(job(corpus_dir, data_cache, run_dir, 2, "fsdp", **ASYNC), 2, tmp_path / "log2")
    ref = losses(reference)
    got = losses(run_dir)
    assert got == pytest.approx({s: ref[s] for s in got}, rel=1e-5, abs=1e-6)
    assert sorted(got) == list(range(STEPS))
