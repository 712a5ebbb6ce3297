"""Pipeline parallelism (strategy.pp) on CPU gloo ranks against one process.

PP=2 (1F1B), an interleaved schedule with two stages per rank, and FSDP x PP = 2 x 2 give the
single-process losses step for step (a step's micro-batches are the single run's gradient
accumulation); a checkpoint written with two stages resumes in one process (DCP reshards it by
the unsplit model's names) exactly as the uninterrupted run continues, and exports to Hugging
Face with the logits transformers computes.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.distributed.test_strategies import STEPS, job, losses, run

pytestmark = pytest.mark.slow

# Four layers so an interleaved schedule has 2 x 2 stages; micro-batches of 2 rows, 4 per step.
SHAPE = {"model.n_layers": 4}


def _run(corpus_dir: Path, data_cache: Path, root: Path, name: str, world: int, **extra: object) -> Path:
    run_dir = root / name / "run"
    strategy = "single" if world == 1 else "fsdp"
    overrides = job(corpus_dir, data_cache, run_dir, world, strategy, **SHAPE, **extra)
    run(overrides, world, root / f"{name}.log")
    return run_dir


@pytest.fixture(scope="module")
def runs(corpus_dir: Path, data_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pp")
    return {
        "single": _run(corpus_dir, data_cache, root, "single", 1),
        "pp2": _run(corpus_dir, data_cache, root, "pp2", 2, **{"strategy.pp": 2}),
        "pp2-interleaved": _run(
            corpus_dir,
            data_cache,
            root,
            "pp2-interleaved",
            2,
            **{
                "strategy.pp": 2,
                "strategy.pp_schedule": "Interleaved1F1B",
                "strategy.pp_stages_per_rank": 2,
                "strategy.activation_checkpointing": "full",
            },
        ),
        "fsdp2xpp2": _run(corpus_dir, data_cache, root, "fsdp2xpp2", 4, **{"strategy.pp": 2}),
    }


@pytest.mark.parametrize("layout", ["pp2", "pp2-interleaved", "fsdp2xpp2"])
def test_pipeline_parallel_matches_one_process(runs: dict[str, Path], layout: str) -> None:
    ref, got = losses(runs["single"]), losses(runs[layout])
    assert sorted(got) == sorted(ref) == list(range(STEPS))
    assert got == pytest.approx(ref, rel=1e-5, abs=1e-6)
    assert losses(runs[layout], "val/loss") == pytest.approx(losses(runs["single"], "val/loss"), rel=1e-5)
    assert losses(runs[layout], "train/grad_norm") == pytest.approx(
        losses(runs["single"], "train/grad_norm"), rel=1e-4
    )


def test_pipeline_checkpoint_holds_each_stage_once(runs: dict[str, Path]) -> None:
    """Every tensor of the unsplit model is in the checkpoint under its own name, written once."""
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(str(runs["pp2"] / "checkpoints" / "step0000005.ckpt")).read_metadata()
    weights = {
        key.removeprefix("state_dict.model."): value
        for key, value in meta.state_dict_metadata.items()
        if key.startswith("state_dict.model.")
    }
    expected = {"tok_embeddings.weight", "norm.weight", "lm_head.weight"}
    expected |= {f"layers.{i}.attention.q_proj.weight" for i in range(4)}
    assert expected <= set(weights)
    assert all(len(weights[key].chunks) == 1 for key in expected)  # type: ignore[union-attr]


def test_pipeline_checkpoint_resumes_in_one_process(
    runs: dict[str, Path], corpus_dir: Path, data_cache: Path, tmp_path: Path
) -> None:
    """PP=2's step-5 checkpoint continued by a single process: the uninterrupted run's losses."""
    run_dir = tmp_path / "run"
    ckpt = runs["pp2"] / "checkpoints" / "step0000005.ckpt"
    # One FSDP process: DCP reads the stages' shards into the whole model.
    overrides = job(corpus_dir, data_cache, run_dir, 1, "fsdp", **SHAPE, resume=str(ckpt))
    run(overrides, 1, tmp_path / "log")
    ref, got = losses(runs["single"]), losses(run_dir)
    assert sorted(got) == list(range(5, STEPS))
    assert got == pytest.approx({s: ref[s] for s in got}, rel=1e-5, abs=1e-6)


def test_export_of_pipeline_parallel_checkpoint(runs: dict[str, Path], tmp_path: Path) -> None:
    """The stages' shards export as one Hugging Face model whose logits transformers reproduces."""
    from orchestra.train.export import export_hf
    from tests.train.test_export import assert_transformers_matches

    ckpt = runs["fsdp2xpp2"] / "checkpoints" / "last.ckpt"
    assert_transformers_matches(ckpt, export_hf(ckpt, tmp_path / "hf"))
