"""Randomized fault injection into a 2-process FSDP2 job (torchrun, gloo on CPU).

Each cycle starts the job with resume=auto, waits for a random step, then sends SIGKILL, SIGTERM
or SIGUSR1 to a random rank (tests/faults.py draws them from one seed; set ORCHESTRA_FAULT_SEED to
replay another draw). After the faults the job is run to its end, and its per-step losses must be
the uninterrupted job's, bit for bit: nothing lost, nothing trained twice, nothing left hanging.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from orchestra.train.checkpoint import checkpoint_step, verify_checkpoint
from tests.faults import Fault, FaultPlan, logged_steps, losses, rank_pids, send, wait_for_step
from tests.helpers import cli_overrides

pytestmark = pytest.mark.slow

STEPS = 40
CKPT_EVERY = 4
CYCLES = 6
SEED = int(os.environ.get("ORCHESTRA_FAULT_SEED", "20261202"))
EXIT_TIMEOUT_S = 120


def overrides(corpus_dir: Path, data_cache: Path, run_dir: Path) -> list[str]:
    return cli_overrides(
        corpus_dir,
        data_cache,
        run_dir,
        **{
            "trainer.max_steps": STEPS,
            "trainer.ckpt_every_n_steps": CKPT_EVERY,
            "trainer.val_every_n_steps": 20,
            "trainer.micro_batch_size": 2,
            "trainer.global_batch_size": 8,
            "trainer.devices": 2,
            "trainer.accelerator": "cpu",
            "strategy": "fsdp",
            # A rank left alone by a killed peer gives up in seconds, not the default half hour.
            "trainer.signal_grace_s": 5,
            "trainer.collective_timeout_s": 30,
        },
    )


def launch(args: list[str], log: Path, token: str) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "ORCHESTRA_FAULT_JOB": token,  # how the harness finds this job's ranks in /proc
    }
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "--max-restarts=0", "-m", "orchestra.cli.train", *args,
    ]  # fmt: skip
    return subprocess.Popen(
        cmd, stdout=open(log, "ab"), stderr=subprocess.STDOUT, env=env, start_new_session=True
    )


def finish(proc: subprocess.Popen[bytes], log: Path) -> int:
    try:
        return proc.wait(timeout=EXIT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"the job hung after a fault:\n{log.read_text()[-4000:]}")


def test_random_faults_on_a_two_process_fsdp_job_lose_nothing(
    corpus_dir: Path, data_cache: Path, tmp_path: Path
) -> None:
    reference = tmp_path / "reference"
    log = tmp_path / "reference.log"
    assert finish(launch(overrides(corpus_dir, data_cache, reference), log, "ref"), log) == 0, (
        log.read_text()[-3000:]
    )

    run = tmp_path / "faulted"
    log = tmp_path / "faulted.log"
    plan = FaultPlan(SEED, CYCLES, world_size=2)
    faults: list[Fault] = []
    for cycle in range(CYCLES):
        token = uuid.uuid4().hex
        proc = launch(overrides(corpus_dir, data_cache, run), log, token)
        fault, target = plan.draw(cycle, max(logged_steps(run), 0), CKPT_EVERY)
        fault.after_step = target = min(target, STEPS - 3)  # land before the job can finish
        newest = wait_for_step(run, target, lambda p=proc: p.poll() is None, timeout=180)
        assert newest != -2, f"cycle {cycle}: the job ended before its fault:\n{log.read_text()[-3000:]}"
        # A short random wait: the signal lands mid-step, mid-save or in a collective.
        proc_alive = proc.poll() is None
        pids = rank_pids(lambda env, t=token: env.get("ORCHESTRA_FAULT_JOB") == t)
        assert proc_alive and sorted(pids) == [0, 1], pids
        time.sleep(fault.delay_s)
        assert send(pids, fault), f"rank {fault.rank} was gone before its {fault.what}"
        fault.outcome = f"exit {finish(proc, log)}"
        faults.append(fault)

    # After the last fault: run to the end (resume=auto picks the newest intact checkpoint).
    proc = launch(overrides(corpus_dir, data_cache, run), log, "final")
    assert finish(proc, log) == 0, log.read_text()[-4000:]

    report = [
        f"{f.cycle}: {f.what} -> rank {f.rank} after step {f.after_step} (+{f.delay_s:.2f} s): {f.outcome}"
        for f in faults
    ]
    print("\n".join(report))
    assert {f.what for f in faults} >= {"SIGKILL", "SIGTERM", "SIGUSR1"}, report
    assert all(f.outcome != "exit 0" for f in faults), report  # every fault interrupted the job
    got, want = losses(run), losses(reference)
    assert sorted(want) == list(range(STEPS))
    assert got == want, report
    last = run / "checkpoints" / "last.ckpt"
    assert checkpoint_step(last) == STEPS and verify_checkpoint(last)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["resumed_from"] is not None
