"""Lightning's DeepSpeedStrategy on a real GPU: train, resume from the half-way checkpoint, export.

Lightning refuses DeepSpeed without CUDA, so these skip on CPU machines; `single` runs the same
save / resume / export path anywhere, so the check itself is exercised off the GPU too.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.gpu import deepspeed_check as ds

NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="Lightning's DeepSpeedStrategy needs CUDA")
STEPS = 8  # the smallest that logs losses on both sides of the half-way checkpoint


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize(
    "strategy",
    [
        pytest.param("deepspeed_zero2", marks=NO_CUDA),
        pytest.param("deepspeed_zero3", marks=NO_CUDA),
        "single",
    ],
)
def test_save_resume_export_match(strategy: str, corpus_overrides: list[str], tmp_path: Path) -> None:
    args = ds.parse_args(["--strategies", strategy, "--steps", str(STEPS), *corpus_overrides])
    try:
        result = ds.check_strategy(strategy, args, tmp_path)
    except ds.CheckFailed as err:
        pytest.fail(str(err), pytrace=False)
    assert result["resumed_from"] and result["compared_steps"] > 0
    assert result["max_loss_diff"] <= args.tol and result["first_diff"] <= args.tol_first
    assert result["max_logits_diff"] <= args.logits_atol
