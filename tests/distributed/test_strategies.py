"""DDP and FSDP2 on 2 CPU processes (gloo, launched by torchrun) against a single-process run.

Same global batch, same data, same init: per-step losses must agree, and a checkpoint written at
one world size must continue at another exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import cli_overrides

pytestmark = pytest.mark.slow
STEPS = 10


def run(overrides: list[str], nproc: int, log: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    launcher = [sys.executable, "-m", "orchestra.cli.train"]
    if nproc > 1:
        launcher = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "-m",
            "orchestra.cli.train",
        ]
    with open(log, "wb") as out:
        proc = subprocess.run(
            [*launcher, *overrides], stdout=out, stderr=subprocess.STDOUT, env=env, timeout=600
        )
    assert proc.returncode == 0, log.read_text()[-4000:]


def losses(run_dir: Path, key: str = "train/loss") -> dict[int, float]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return {int(r["step"]): float(r[key]) for r in csv.DictReader(f) if r.get(key)}


def job(
    corpus_dir: Path, data_cache: Path, run_dir: Path, world: int, strategy: str, **extra: object
) -> list[str]:
    return cli_overrides(
        corpus_dir,
        data_cache,
        run_dir,
        **{
            "trainer.max_steps": STEPS,
            "trainer.ckpt_every_n_steps": 5,
            "trainer.val_every_n_steps": 5,
            "trainer.micro_batch_size": 2,
            "trainer.global_batch_size": 8,
            "trainer.devices": world,
            "trainer.accelerator": "cpu",
            "strategy": strategy,
            **extra,
        },
    )


@pytest.fixture(scope="module")
def reference(corpus_dir: Path, data_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted single-process run (accumulation 4)."""
    run_dir = tmp_path_factory.mktemp("single") / "run"
    run(job(corpus_dir, data_cache, run_dir, 1, "single"), 1, run_dir.parent / "log")
    return run_dir


@pytest.fixture(scope="module")
def two_rank_runs(
    corpus_dir: Path, data_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    out = {}
    variants: dict[str, tuple[str, dict[str, object]]] = {
        "ddp": ("ddp", {}),
        "fsdp": ("fsdp", {}),
        # The three outside-the-model options together under sharding.
        "fsdp-ac-compile": (
            "fsdp",
            {
                "strategy.activation_checkpointing": "every_k",
                "strategy.ac_every_k": 1,
                "strategy.compile": True,
            },
        ),
        "ddp-ac": ("ddp", {"strategy.activation_checkpointing": "full"}),
        # HSDP on a (1 node x 2 ranks) mesh, the root kept unsharded between forward and backward.
        "hsdp-noreshard": ("fsdp", {"strategy.hybrid_shard": True, "strategy.reshard_after_forward": False}),
        # The fused kernels (Triton's CPU interpreter here) under sharding: the loss kernel reads
        # lm_head.weight inside the model's forward, where FSDP has gathered it.
        "fsdp-triton": ("fsdp", {"model.kernels": "triton"}),
    }
    for name, (strategy, extra) in variants.items():
        run_dir = tmp_path_factory.mktemp(name) / "run"
        run(job(corpus_dir, data_cache, run_dir, 2, strategy, **extra), 2, run_dir.parent / "log")
        out[name] = run_dir
    return out


@pytest.mark.parametrize(
    "strategy", ["ddp", "fsdp", "fsdp-ac-compile", "ddp-ac", "hsdp-noreshard", "fsdp-triton"]
)
def test_two_ranks_match_one_process(reference: Path, two_rank_runs: dict[str, Path], strategy: str) -> None:
    ref, got = losses(reference), losses(two_rank_runs[strategy])
    assert sorted(got) == sorted(ref) == list(range(STEPS))
    # compile may fuse float ops differently; everything else is exact up to reduction order
    tol = 1e-4 if "compile" in strategy else 1e-5
    assert got == pytest.approx(ref, rel=tol, abs=1e-6)
    assert losses(two_rank_runs[strategy], "val/loss") == pytest.approx(
        losses(reference, "val/loss"), rel=tol
    )


def test_fsdp_checkpoint_is_sharded(two_rank_runs: dict[str, Path]) -> None:
    ckpt = two_rank_runs["fsdp"] / "checkpoints" / "step0000005.ckpt"
    assert ckpt.is_dir() and (ckpt / "meta.pt").is_file()
    assert sorted(p.name for p in ckpt.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert not list(ckpt.parent.glob("*.tmp-*"))


@pytest.mark.parametrize(
    ("source", "world", "strategy"),
    [("fsdp", 1, "fsdp"), ("ddp", 1, "single"), ("single", 2, "ddp"), ("fsdp", 4, "fsdp")],
    ids=["fsdp-2to1", "ddp-2to1", "single-1to2", "fsdp-2to4"],
)
def test_resume_at_another_world_size(
    reference: Path,
    two_rank_runs: dict[str, Path],
    corpus_dir: Path,
    data_cache: Path,
    tmp_path: Path,
    source: str,
    world: int,
    strategy: str,
) -> None:
    origin = reference if source == "single" else two_rank_runs[source]
    ckpt = origin / "checkpoints" / "step0000005.ckpt"
    run_dir = tmp_path / "resumed"
    run(job(corpus_dir, data_cache, run_dir, world, strategy, resume=ckpt), world, tmp_path / "log")
    ref, got = losses(reference), losses(run_dir)
    assert sorted(got) == list(range(5, STEPS))  # continued from step 5 with the same data
    assert got == pytest.approx({s: ref[s] for s in got}, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_export_of_distributed_checkpoints(
    two_rank_runs: dict[str, Path], tmp_path: Path, strategy: str
) -> None:
    from orchestra.train.export import export_hf
    from tests.train.test_export import assert_transformers_matches

    ckpt = two_rank_runs[strategy] / "checkpoints" / "last.ckpt"
    assert_transformers_matches(ckpt, export_hf(ckpt, tmp_path / "hf"))
