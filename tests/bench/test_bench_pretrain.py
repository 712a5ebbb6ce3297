"""bench/pretrain.py off the GPU: --kernels / --override give valid `orchestra-train` runs; the loss diff."""

from __future__ import annotations

import csv
import importlib
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def bench():
    return importlib.import_module("bench.pretrain")  # bench/ is a package beside tests/


def test_kernels_and_overrides_make_one_valid_run_per_choice(bench, tmp_path):
    args = bench.parse_args(["--presets", "llama-125m", "--kernels", "torch", "triton", "--steps", "200",
                             "--override", "trainer.precision=bf16-mixed", "--override", "optim.lr=1e-4"])  # fmt: skip
    runs = bench.plan(args.presets, args.kernels, args.steps, tmp_path, args.override)
    assert [(p, k) for p, k, _ in runs] == [("llama-125m", "torch"), ("llama-125m", "triton")]
    for _, kernels, overrides in runs:
        assert f"hydra.run.dir={tmp_path / f'llama-125m-{kernels}'}" in overrides
        cfg = bench.compose_check(overrides)
        assert cfg.model.kernels.value == kernels
        assert cfg.model.dim == 768 and cfg.model.max_seq_len == 1024
        assert cfg.trainer.max_steps == 200 and cfg.trainer.precision == "bf16-mixed"
        assert cfg.optim.lr == pytest.approx(1e-4)  # an --override wins over the preset's value


def test_default_leaves_model_kernels_to_the_config(bench, tmp_path):
    args = bench.parse_args(["--presets", "debug"])
    ((preset, kernels, overrides),) = bench.plan(args.presets, args.kernels, args.steps, tmp_path)
    assert (preset, kernels) == ("debug", None)
    assert not any(o.startswith("model.kernels=") for o in overrides)
    assert bench.compose_check(overrides).model.kernels.value == "auto"


def test_override_must_be_key_value(bench):
    with pytest.raises(SystemExit):
        bench.parse_args(["--override", "trainer.precision"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--kernels", "cuda"])


def _metrics(run_dir: Path, losses: dict[int, float]) -> None:
    run_dir.mkdir(parents=True)
    with open(run_dir / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["step", "train/loss", "perf/tokens_per_s"])
        writer.writeheader()
        for step, loss in losses.items():
            writer.writerow({"step": step, "train/loss": loss})
            writer.writerow({"step": step, "perf/tokens_per_s": 1000.0})  # a row without a loss


def test_kernel_comparison_reports_speed_up_and_loss_difference(bench, tmp_path):
    _metrics(tmp_path / "llama-125m-torch", {19: 8.0, 39: 7.5, 59: 7.0})
    _metrics(tmp_path / "llama-125m-triton", {19: 8.0, 39: 7.52, 59: 6.99})
    assert bench.max_loss_difference(bench.read_losses(tmp_path / "llama-125m-torch"),
                                     bench.read_losses(tmp_path / "llama-125m-triton")) == (pytest.approx(0.02), 3)  # fmt: skip
    results = [{"preset": "llama-125m", "kernels": "torch", "tokens_per_s": 100000},
               {"preset": "llama-125m", "kernels": "triton", "tokens_per_s": 125000},
               {"preset": "debug", "kernels": "torch", "tokens_per_s": 5}]  # fmt: skip
    (line,) = bench.kernel_comparison(results, tmp_path)
    assert line.startswith(
        "llama-125m: triton vs torch: 1.250x tokens/s; max |train/loss torch - triton| = 0.02 "
    )
    assert line.endswith("over 3 logged steps")
    table = bench.markdown(
        [{**results[0], "error": None}, {"preset": "debug", "kernels": "auto", "error": "exit 1"}]
    )
    assert "| llama-125m | torch | - | - | - | 100000 | - | - | - | - |" in table
    assert table.splitlines()[-1].endswith("| exit 1 |")
    assert bench.max_loss_difference({1: 1.0}, {2: 1.0}) is None
