"""task=grpo under DDP and FSDP2 on 2 CPU processes against one process with accumulation.

Samples are seeded by step and example, and a rank's micro-batch holds the examples one process's
micro-batch would, so the layouts draw the same completions and must log the same rewards and losses.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.distributed.test_strategies import job, losses, run

pytestmark = pytest.mark.slow

STEPS = 4


def grpo_job(
    corpus_dir: Path, data_cache: Path, run_dir: Path, world: int, strategy: str, base: Path
) -> list[str]:
    return job(
        corpus_dir,
        data_cache,
        run_dir,
        world,
        strategy,
        **{
            "task": "grpo",
            "task.reward": "regex",
            "task.reward_pattern": "'[0-9]'",
            "task.group_size": 4,
            "task.max_new_tokens": 6,
            "finetune": "lora",
            "finetune.init_from": base,
            "finetune.lora_targets": "[all-linear]",
            "optim.lr": 0.01,
            "trainer.max_steps": STEPS,
            "trainer.micro_batch_size": 2,
            "trainer.global_batch_size": 4,
            "trainer.val_every_n_steps": STEPS,
            "trainer.val_batches": 2,
            "trainer.ckpt_every_n_steps": STEPS,
            "scheduler": "constant",
            "scheduler.warmup_steps": 0,
        },
    )


def test_grpo_under_ddp_and_fsdp_matches_one_process(
    corpus_dir: Path, examples_cache: Path, trained_run: Path, tmp_path: Path
) -> None:
    base = trained_run / "checkpoints" / "last.ckpt"
    runs = {}
    for name, world, strategy in (("single", 1, "single"), ("ddp", 2, "ddp"), ("fsdp", 2, "fsdp")):
        runs[name] = tmp_path / name
        run(
            grpo_job(corpus_dir, examples_cache, runs[name], world, strategy, base),
            world,
            tmp_path / f"{name}.log",
        )
    for key in ("train/reward", "train/loss", "train/kl"):
        ref = losses(runs["single"], key)
        assert sorted(ref) == list(range(STEPS)), key
        for name in ("ddp", "fsdp"):
            assert losses(runs[name], key) == pytest.approx(ref, rel=1e-4, abs=1e-6), (name, key)
    assert any(v > 0 for v in losses(runs["single"], "train/reward").values())  # a signal to learn from
    val = {name: losses(path, "val/reward") for name, path in runs.items()}
    assert val["ddp"] == val["fsdp"] == val["single"]
