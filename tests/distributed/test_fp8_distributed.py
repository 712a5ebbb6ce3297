"""strategy.fp8 under FSDP2 on 2 CPU gloo ranks (torchao's emulation): tensorwise scaling with
FP8 weight all-gathers gives the single-process FP8 losses, and those stay close to full precision."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.distributed.test_strategies import STEPS, job, losses, run

pytestmark = pytest.mark.slow
FP8 = {"strategy.fp8": "tensorwise", "strategy.fp8_emulate": True}


def test_fsdp_fp8_all_gather_matches_one_process(corpus_dir: Path, data_cache: Path, tmp_path: Path) -> None:
    runs = {}
    for name, world, strategy, extra in [
        ("plain", 1, "single", {}),
        ("fp8", 1, "single", FP8),
        ("fsdp-fp8", 2, "fsdp", FP8),
    ]:
        runs[name] = tmp_path / name / "run"
        run(
            job(corpus_dir, data_cache, runs[name], world, strategy, **extra), world, tmp_path / f"{name}.log"
        )
    plain, fp8, sharded = (losses(runs[n]) for n in ("plain", "fp8", "fsdp-fp8"))
    assert sorted(sharded) == list(range(STEPS))
    # The weights' amax is reduced over the shards, so the scales and the numbers are the same.
    assert sharded == pytest.approx(fp8, rel=1e-5, abs=1e-5)
    assert fp8 == pytest.approx(plain, rel=5e-3)
    assert fp8 != plain
