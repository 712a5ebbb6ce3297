"""`sbatch slurm/serve.sh` on the real local cluster: the server answers the official client at the
address the job writes, and SIGTERM (Slurm's end-of-time signal) drains it to a clean exit."""

from __future__ import annotations

import time
from pathlib import Path

import openai
import pytest

from tests.serve.live import free_port, tiny_checkpoint
from tests.slurm.conftest import SlurmCluster
from tests.slurm.test_slurm_pretrain import job_env  # noqa: F401 - a fixture

pytestmark = pytest.mark.slow


def test_serve_job_answers_and_drains_on_sigterm(
    slurm_cluster: SlurmCluster,
    job_env: dict[str, str],  # noqa: F811
    tmp_path: Path,
) -> None:
    ckpt = tiny_checkpoint(tmp_path / "tiny.ckpt")
    port = free_port()
    log = tmp_path / "serve.out"
    job = slurm_cluster.sbatch(
        "--gpus-per-node=0", "--cpus-per-task=1", "--time=10:00", f"--output={log}", "slurm/serve.sh",
        f"ckpt={ckpt}", f"port={port}", "model_name=tiny", "default_max_tokens=8",
        env={**job_env, "ORCHESTRA_API_KEYS": "slurm-key"},
    )  # fmt: skip
    address_file = Path(job_env["ORCHESTRA_RUNS"]) / ".slurm" / f"{job}.serve"
    deadline = time.time() + 180
    while not address_file.is_file() and time.time() < deadline:
        time.sleep(0.5)
    address = address_file.read_text().strip()
    assert address.endswith(f":{port}") and address.startswith("http://orch-node")
    client = openai.OpenAI(base_url=address + "/v1", api_key="slurm-key", max_retries=0, timeout=30)
    reply = None
    while time.time() < deadline and reply is None:
        try:
            reply = client.completions.create(model="tiny", prompt="def", max_tokens=4)
        except openai.APIConnectionError:
            time.sleep(0.5)
    assert reply is not None and reply.choices[0].finish_reason in ("length", "stop"), log.read_text()
    slurm_cluster.run("scancel", "--batch", "--signal=TERM", job)
    info = slurm_cluster.wait(job, timeout=120)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, text)
    assert "SIGTERM: draining the server" in text and "server stopped" in text
    assert not address_file.exists()
