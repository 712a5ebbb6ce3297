"""`sbatch slurm/pretrain.sh` on a real two-node Slurm cluster (gloo on CPU, one rank per node).

One uninterrupted job is the reference; a job preempted mid-run must checkpoint, requeue itself,
resume in the same run dir and log exactly the reference's per-step losses; a mistyped override
must fail at once and never requeue.
"""

from __future__ import annotations

import csv
import json
import os
import re
import sys
import time
from pathlib import Path

import pytest

from orchestra.train.checkpoint import checkpoint_step, verify_checkpoint
from tests.faults import Fault, FaultPlan, logged_steps, rank_pids, send, wait_for_step
from tests.faults import losses as fault_losses
from tests.helpers import cli_overrides
from tests.slurm.conftest import REPO, SlurmCluster

pytestmark = pytest.mark.slow

STEPS = 300  # ~12 s of training at 2 ranks: long enough to signal a job mid-run
CKPT_EVERY = 50
FAULT_SEED = int(os.environ.get("ORCHESTRA_FAULT_SEED", "20261202"))


def sbatch_args(log: Path) -> list[str]:
    """The command-line overrides of the script's GPU defaults for this CPU cluster."""
    return [
        "--nodes=2",
        "--ntasks-per-node=1",
        "--gpus-per-node=0",
        "--cpus-per-task=1",
        "--time=10:00",
        f"--output={log}",
        "slurm/pretrain.sh",
    ]


@pytest.fixture(scope="module")
def job_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    runs = tmp_path_factory.mktemp("slurm-runs")
    return {
        "ORCHESTRA_ACCELERATOR": "cpu",
        "ORCHESTRA_RUNS": str(runs),
        "ORCHESTRA_VENV": str(Path(sys.executable).parent.parent),
    }


def overrides(corpus_dir: Path, data_cache: Path) -> list[str]:
    """tests/helpers' tiny job; without hydra.run.dir, so the run dir is named after the job id."""
    args = cli_overrides(
        corpus_dir,
        data_cache,
        Path("unused"),
        **{
            "trainer.max_steps": STEPS,
            "trainer.ckpt_every_n_steps": CKPT_EVERY,
            "trainer.val_every_n_steps": CKPT_EVERY,
        },
    )
    return [a for a in args if not a.startswith("hydra.run.dir=")]


def losses(run_dir: Path) -> dict[int, float]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


@pytest.fixture(scope="module")
def reference(
    slurm_cluster: SlurmCluster,
    job_env: dict[str, str],
    corpus_dir: Path,
    data_cache: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[str, dict[str, str], Path, Path]:
    """The uninterrupted job: (job id, scontrol record, log, run dir)."""
    log = tmp_path_factory.mktemp("reference") / "job.out"
    # Planned for a GPU the way a GPU job is (CPU jobs skip the plan unless a GPU is named): a job
    # that fits is started as before.
    env = {**job_env, "ORCHESTRA_PLAN_GPU": "h100-80gb"}
    job_id = slurm_cluster.sbatch(*sbatch_args(log), *overrides(corpus_dir, data_cache), env=env)
    info = slurm_cluster.wait(job_id)
    return job_id, info, log, slurm_cluster.run_dir(job_env["ORCHESTRA_RUNS"], "tiny", job_id)


def test_two_nodes_one_process_group(
    reference: tuple[str, dict[str, str], Path, Path], job_env: dict[str, str]
) -> None:
    job_id, info, log, run_dir = reference
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", text[-4000:]
    assert info["Restarts"] == "0"
    assert info["NodeList"] == "orch-node[1-2]"
    assert "Orchestra plan" in text and "fits" in text  # orchestra-plan ran before the ranks
    assert "Starting with 2 processes" in text  # Lightning: both ranks joined one process group
    assert "MASTER_ADDR=orch-node1" in text
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["strategy"] == "ddp" and summary["steps"] == STEPS
    # One run dir for the job, shared by both ranks.
    # One dir per job, named after the cluster, the job id and its first start (job ids repeat).
    assert [p.name for p in run_dir.parent.iterdir()] == [run_dir.name]
    assert re.fullmatch(rf"[\w.-]+-{job_id}-\d{{8}}-\d{{6}}", run_dir.name), run_dir.name
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert sorted(losses(run_dir)) == list(range(STEPS))


def test_preempted_job_checkpoints_requeues_and_matches(
    slurm_cluster: SlurmCluster,
    reference: tuple[str, dict[str, str], Path, Path],
    job_env: dict[str, str],
    corpus_dir: Path,
    data_cache: Path,
    tmp_path: Path,
) -> None:
    log = tmp_path / "job.out"
    job_id = slurm_cluster.sbatch(*sbatch_args(log), *overrides(corpus_dir, data_cache), env=job_env)
    run_dir = slurm_cluster.run_dir(job_env["ORCHESTRA_RUNS"], "tiny", job_id)
    first_ckpt = run_dir / "checkpoints" / f"step{CKPT_EVERY:07d}.ckpt"
    deadline = time.time() + 180
    while not first_ckpt.exists():
        assert time.time() < deadline, (
            f"no checkpoint after 180 s: {log.read_text()[-3000:] if log.exists() else ''}"
        )
        assert slurm_cluster.job(job_id)["JobState"] in ("PENDING", "RUNNING"), log.read_text()[-3000:]
        time.sleep(0.2)
    # What Slurm does --signal seconds before a preemption or the time limit, at once.
    slurm_cluster.run("scancel", "--signal=USR1", "--batch", job_id)

    info = slurm_cluster.wait(job_id)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", text[-4000:]
    assert info["Restarts"] == "1", text[-4000:]
    assert "received SIGUSR1" in text and "requeueing job" in text
    assert "SLURM_RESTART_COUNT=1" in text
    saved = [line for line in text.splitlines() if line.startswith("preemption:")]
    assert len(saved) == 1, text[-4000:]
    step = int(saved[0].rsplit("saved at step ", 1)[1].split(";")[0])
    assert CKPT_EVERY <= step < STEPS  # preempted mid-run, not at the end
    assert (run_dir / "checkpoints" / f"step{step:07d}.ckpt").is_file()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from"].endswith(f"step{step:07d}.ckpt")
    # last.ckpt is the newest checkpoint after the requeue, replaced in place, never last-vN.
    ckpts = run_dir / "checkpoints"
    assert checkpoint_step(ckpts / "last.ckpt") == STEPS
    assert not list(ckpts.glob("last-v*")), sorted(p.name for p in ckpts.iterdir())
    assert verify_checkpoint(ckpts / "last.ckpt")
    # Same run dir, same data order: the resumed job continues the uninterrupted one exactly.
    got, ref = losses(run_dir), losses(reference[3])
    assert sorted(got) == list(range(STEPS))
    assert got == pytest.approx(ref, rel=1e-6, abs=1e-7)


def test_mistyped_override_fails_once(
    slurm_cluster: SlurmCluster, job_env: dict[str, str], corpus_dir: Path, data_cache: Path, tmp_path: Path
) -> None:
    log = tmp_path / "job.out"
    started = time.time()
    job_id = slurm_cluster.sbatch(
        *sbatch_args(log), *overrides(corpus_dir, data_cache), "trainer.max_stepz=5", env=job_env
    )
    info = slurm_cluster.wait(job_id, timeout=120)
    text = log.read_text()
    assert info["JobState"] == "FAILED", text[-3000:]
    assert info["Restarts"] == "0"
    # The schema check exits 2 on the rank that fails first; srun --kill-on-bad-exit may then end the other (143).
    assert info["ExitCode"] in ("2:0", "143:0")
    assert "max_stepz" in text  # Hydra names the key
    assert "not requeueing" in text
    assert time.time() - started < 90
    assert not (slurm_cluster.run_dir(job_env["ORCHESTRA_RUNS"], "tiny", job_id) / "checkpoints").exists()


def test_a_layout_the_plan_says_cannot_fit_never_starts(
    slurm_cluster: SlurmCluster, job_env: dict[str, str], corpus_dir: Path, data_cache: Path, tmp_path: Path
) -> None:
    """orchestra-plan refuses before srun: one error naming the fix, no rank started, no requeue.

    A limit of 0.1 % of an H100 makes the tiny job "too large" without building a large model
    should the check ever let it through.
    """
    log = tmp_path / "job.out"
    env = {**job_env, "ORCHESTRA_PLAN_GPU": "h100-80gb", "ORCHESTRA_PLAN_FAIL_ABOVE": "0.001"}
    job_id = slurm_cluster.sbatch(*sbatch_args(log), *overrides(corpus_dir, data_cache), env=env)
    info = slurm_cluster.wait(job_id, timeout=120)
    text = log.read_text()
    assert info["JobState"] == "FAILED", text[-3000:]
    assert info["Restarts"] == "0" and info["ExitCode"] == "2:0"
    assert "GiB per rank, more than 0.001 x" in text and "ORCHESTRA_SKIP_PLAN=1" in text
    assert "not starting, not requeueing" in text
    assert "command: srun" not in text  # the training step was never launched
    assert not list(Path(job_env["ORCHESTRA_RUNS"]).glob(f"tiny/*-{job_id}-*"))


def test_script_defaults_are_overridable() -> None:
    """The #SBATCH header carries the documented defaults (sbatch's command line overrides them)."""
    header = [
        line
        for line in (REPO / "slurm" / "pretrain.sh").read_text().splitlines()
        if line.startswith("#SBATCH")
    ]
    options = {line.split()[1].split("=")[0] for line in header}
    assert {
        "--nodes",
        "--ntasks-per-node",
        "--gpus-per-node",
        "--cpus-per-task",
        "--time",
        "--output",
        "--requeue",
        "--signal",
    } <= options
    assert "#SBATCH --signal=B:USR1@300" in header


def test_node_failure_resumes_from_periodic_checkpoint(
    slurm_cluster: SlurmCluster,
    reference: tuple[str, dict[str, str], Path, Path],
    job_env: dict[str, str],
    corpus_dir: Path,
    data_cache: Path,
    tmp_path: Path,
) -> None:
    log = tmp_path / "job.out"
    job_id = slurm_cluster.sbatch(*sbatch_args(log), *overrides(corpus_dir, data_cache), env=job_env)
    run_dir = slurm_cluster.run_dir(job_env["ORCHESTRA_RUNS"], "tiny", job_id)
    first_ckpt = run_dir / "checkpoints" / f"step{CKPT_EVERY:07d}.ckpt"
    deadline = time.time() + 180
    while not first_ckpt.exists():
        assert time.time() < deadline, (
            f"no checkpoint after 180 s: {log.read_text()[-3000:] if log.exists() else ''}"
        )
        time.sleep(0.2)
    # A node dies: Slurm kills the job and, as it was submitted with --requeue, requeues it.
    slurm_cluster.run("scontrol", "update", "nodename=orch-node2", "state=down", "reason=orchestra-test")
    try:
        deadline = time.time() + 60
        while slurm_cluster.job(job_id).get("Restarts") == "0":
            assert time.time() < deadline, "job was not requeued after its node went down"
            time.sleep(0.5)
    finally:
        # The node comes back (ReturnToService=2 may already have done it).
        slurm_cluster.run("scontrol", "update", "nodename=orch-node2", "state=resume", check=False)
    info = slurm_cluster.wait(job_id)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", text[-4000:]
    assert info["Restarts"] == "1"
    summary = json.loads((run_dir / "summary.json").read_text())
    resumed = Path(summary["resumed_from"])
    assert resumed.parent == run_dir / "checkpoints"  # a checkpoint of this job's own run dir
    got, ref = losses(run_dir), losses(reference[3])
    assert sorted(got) == list(range(STEPS))
    assert got == pytest.approx(ref, rel=1e-6, abs=1e-7)


FAULT_CYCLES = 6


def test_random_faults_on_two_nodes_lose_nothing(
    slurm_cluster: SlurmCluster,
    reference: tuple[str, dict[str, str], Path, Path],
    job_env: dict[str, str],
    corpus_dir: Path,
    data_cache: Path,
    tmp_path: Path,
) -> None:
    """SIGKILL, SIGTERM or SIGUSR1 to a random rank, or its node set down, at a random step, in
    every run of one job (tests/faults.py draws them, ORCHESTRA_FAULT_SEED replays a draw): the
    job requeues itself each time and its per-step losses are the uninterrupted job's, bit for bit."""
    log = tmp_path / "job.out"
    job_id = slurm_cluster.sbatch(*sbatch_args(log), *overrides(corpus_dir, data_cache), env=job_env)
    run_dir = slurm_cluster.run_dir(job_env["ORCHESTRA_RUNS"], "tiny", job_id)
    plan = FaultPlan(FAULT_SEED, FAULT_CYCLES, world_size=2, extra=("node-down",))

    def state() -> dict[str, str]:
        return slurm_cluster.job(job_id)

    def alive() -> bool:
        return state().get("JobState") not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")

    faults: list[Fault] = []
    for cycle in range(FAULT_CYCLES):
        deadline = time.time() + 180
        while not (state().get("JobState") == "RUNNING" and state().get("Restarts") == str(cycle)):
            assert time.time() < deadline and alive(), f"cycle {cycle}: {state()}\n{log.read_text()[-3000:]}"
            time.sleep(0.3)
        fault, target = plan.draw(cycle, max(logged_steps(run_dir), 0), CKPT_EVERY)
        fault.after_step = target = min(target, STEPS - 20)
        assert wait_for_step(run_dir, target, alive, timeout=180) >= target, log.read_text()[-3000:]
        time.sleep(fault.delay_s)
        if fault.what == "node-down":
            slurm_cluster.run(
                "scontrol", "update", "nodename=orch-node2", "state=down", "reason=orchestra-fault"
            )
        else:
            pids = rank_pids(lambda env: env.get("SLURM_JOB_ID") == job_id, rank_var="SLURM_PROCID")
            assert send(pids, fault), f"cycle {cycle}: rank {fault.rank} not found ({pids})"
        try:
            deadline = time.time() + 120
            while state().get("Restarts") == str(cycle):
                assert time.time() < deadline and alive(), (
                    f"cycle {cycle}: not requeued after {fault.what}: {state()}\n{log.read_text()[-4000:]}"
                )
                time.sleep(0.3)
        finally:
            if fault.what == "node-down":
                slurm_cluster.run("scontrol", "update", "nodename=orch-node2", "state=resume", check=False)
        fault.outcome = "requeued"
        faults.append(fault)

    info = slurm_cluster.wait(job_id, timeout=300)
    text = log.read_text()
    report = [f"{f.cycle}: {f.what} -> rank {f.rank} after step {f.after_step}: {f.outcome}" for f in faults]
    print("\n".join(report))
    assert info["JobState"] == "COMPLETED", text[-4000:]
    assert info["Restarts"] == str(FAULT_CYCLES), report
    assert {f.what for f in faults} == {"SIGKILL", "SIGTERM", "SIGUSR1", "node-down"}, report
    assert "not requeueing" not in text
    got, want = fault_losses(run_dir), fault_losses(reference[3])
    assert sorted(want) == list(range(STEPS))
    assert got == want, report
    ckpts = run_dir / "checkpoints"
    assert checkpoint_step(ckpts / "last.ckpt") == STEPS and verify_checkpoint(ckpts / "last.ckpt")
