"""`sbatch slurm/finetune.sh` on the real two-node cluster: SFT, KTO and GRPO LoRA jobs, and a job without a base."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.slurm.conftest import SlurmCluster
from tests.slurm.test_slurm_pretrain import job_env, losses, overrides  # noqa: F401 - job_env is a fixture

pytestmark = pytest.mark.slow


def finetune_args(log: Path) -> list[str]:
    return [
        "--nodes=2",
        "--ntasks-per-node=1",
        "--gpus-per-node=0",
        "--cpus-per-task=1",
        "--time=10:00",
        f"--output={log}",
        "slurm/finetune.sh",
    ]


def finetune_overrides(corpus_dir: Path, data_cache: Path, *extra: str) -> list[str]:
    keep = [a for a in overrides(corpus_dir, data_cache) if not a.startswith("trainer.")]
    return [
        *keep,
        "trainer.max_steps=6",
        "trainer.micro_batch_size=2",
        "trainer.global_batch_size=8",
        "trainer.val_every_n_steps=3",
        "trainer.val_batches=2",
        "trainer.ckpt_every_n_steps=3",
        "trainer.progress_bar=false",
        "trainer.sample_tokens=8",
        "trainer.log_every_n_steps=1",
        *extra,
    ]


# KTO: a preference task (the pairs' data path, a frozen-reference forward) whose reference point
# is averaged over the two nodes' ranks inside every step; GRPO samples with the policy in each step.
@pytest.mark.parametrize("task", ["sft", "kto", "grpo"])
def test_lora_job_on_two_nodes(
    slurm_cluster: SlurmCluster,
    job_env: dict[str, str],  # noqa: F811
    corpus_dir: Path,
    examples_cache: Path,
    trained_run: Path,
    tmp_path: Path,
    task: str,
) -> None:
    log = tmp_path / "job.out"
    base = trained_run / "checkpoints" / "last.ckpt"
    job_id = slurm_cluster.sbatch(
        *finetune_args(log),
        *finetune_overrides(
            corpus_dir,
            examples_cache,
            f"task={task}",
            "finetune=lora",
            f"finetune.init_from={base}",
            *(["task.group_size=2", "task.max_new_tokens=8"] if task == "grpo" else []),
        ),
        env=job_env,
    )
    info = slurm_cluster.wait(job_id)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", text[-4000:]
    run_dir = slurm_cluster.run_dir(job_env["ORCHESTRA_RUNS"], "tiny", job_id)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["task"], summary["finetune"], summary["world_size"], summary["steps"]) == (
        task,
        "lora",
        2,
        6,
    )
    assert sorted(losses(run_dir)) == list(range(6))
    metrics = json.loads(json.dumps(summary["val_metrics"]))
    assert metrics["loss"] > 0 or task == "grpo"  # grpo's val/loss is the negated reward
    if task == "kto":
        assert 0 <= metrics["reward_accuracy"] <= 1 and "reward_margin" in metrics
    if task == "grpo":
        assert metrics["loss"] == -metrics["reward"] and metrics["completion_tokens"] > 0


def test_job_without_a_base_fails_once_naming_the_key(
    slurm_cluster: SlurmCluster,
    job_env: dict[str, str],  # noqa: F811
    corpus_dir: Path,
    data_cache: Path,
    tmp_path: Path,
) -> None:
    log = tmp_path / "job.out"
    started = time.time()
    job_id = slurm_cluster.sbatch(
        *finetune_args(log), *finetune_overrides(corpus_dir, data_cache, "task=sft"), env=job_env
    )
    info = slurm_cluster.wait(job_id, timeout=120)
    text = log.read_text()
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", text[-3000:]
    assert "task=sft adapts a pretrained model" in text
    assert time.time() - started < 90
