"""A real Slurm cluster (controller + two slurmd) on this machine for the tests in this package.

tests/slurm/cluster.sh installs Debian's packages when missing and starts the daemons; the
session fixture always stops them again, touching only what the script started. Without root
or when the installation fails the tests are skipped with the reason.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "tests" / "slurm" / "cluster.sh"


@dataclass
class SlurmCluster:
    """Handle on the running test cluster: the environment its clients need, and job helpers."""

    env: dict[str, str]
    state_dir: Path

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, check=check, timeout=60)

    def sbatch(self, *args: str, env: dict[str, str] | None = None) -> str:
        """Submit from the repository root (as a user would) and return the job id."""
        proc = subprocess.run(
            ["sbatch", "--parsable", *args],
            env={**self.env, **(env or {})},
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, f"sbatch failed: {proc.stderr}"
        return proc.stdout.strip().split(";")[0]

    def run_dir(self, runs: str | Path, name: str, job_id: str, timeout: float = 180.0) -> Path:
        """The job's run dir, named by its batch script's run id (<cluster>-<job id>-<time>)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            found = sorted((Path(runs) / ".slurm").glob(f"*-{job_id}.run-id"))
            if found and found[0].read_text().strip():
                return Path(runs) / name / found[0].read_text().strip()
            time.sleep(0.2)
        raise AssertionError(f"job {job_id} wrote no run id under {runs}/.slurm in {timeout} s")

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...)."""
        out = self.run("scontrol", "-o", "show", "job", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(self, job_id: str, timeout: float = 240.0) -> dict[str, str]:
        """Until the job has finished for good (a requeued job passes through PENDING again)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in (
                "COMPLETED",
                "FAILED",
                "CANCELLED",
                "TIMEOUT",
                "NODE_FAIL",
                "OUT_OF_MEMORY",
            ):
                return info
            time.sleep(1.0)
        self.run("scancel", job_id, check=False)
        raise AssertionError(f"job {job_id} did not finish in {timeout} s: {self.job(job_id)}")


def _root_or_skip() -> None:
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("the local Slurm cluster needs root on Linux (daemons, apt-get, /etc/hosts)")


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    _root_or_skip()
    # Not under pytest's tmp dir: that is private to root, and munged runs as the munge user.
    state_dir = Path(tempfile.mkdtemp(prefix="orchestra-slurm-", dir="/tmp"))
    state_dir.chmod(0o755)
    env = {**os.environ, "ORCHESTRA_SLURM_DIR": str(state_dir), "SLURM_CONF": str(state_dir / "slurm.conf")}
    # Slurm variables of an enclosing job would leak into sbatch/srun.
    env = {
        k: v for k, v in env.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_")) or k == "SLURM_CONF"
    }
    try:
        start = subprocess.run(
            ["bash", str(CLUSTER), "start"], env=env, capture_output=True, text=True, timeout=600
        )
        if start.returncode != 0:
            msg = start.stderr.strip().splitlines()[-1:] or ["(no output)"]
            if "apt-get" in start.stderr or "missing" in start.stderr:
                pytest.skip(f"cannot install Slurm: {msg[0]}")
            pytest.fail(f"local Slurm cluster did not start: {start.stderr[-3000:]}")
        yield SlurmCluster(env=env, state_dir=state_dir)
    finally:
        subprocess.run(["bash", str(CLUSTER), "stop"], env=env, capture_output=True, text=True, timeout=120)
        shutil.rmtree(state_dir, ignore_errors=True)
