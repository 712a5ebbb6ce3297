"""trainer.memory_probe: the choice rule on known memory curves, then real CPU measurements and a run."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from orchestra.config import ActivationCheckpointing, ConfigError, StrategyName
from orchestra.train.memory_probe import PROBE_FILE, ProbeResult, _Prober, candidates, choose, read_result
from orchestra.train.run import plan_run, train, validate_run
from tests.helpers import tiny_config

NONE, EVERY, FULL = (
    ActivationCheckpointing.none,
    ActivationCheckpointing.every_k,
    ActivationCheckpointing.full,
)
MB = 1 << 20


def curve(fixed: int, per_row: dict[ActivationCheckpointing, int], calls: list[tuple[str, int]]):
    """peak(mode, n) = fixed + n x per_row[mode], every call recorded."""

    def measure(mode: ActivationCheckpointing, n: int) -> int:
        calls.append((mode.value, n))
        return fixed + n * per_row[mode]

    return measure


def test_candidates_split_the_share_evenly() -> None:
    assert candidates(12, 1) == [1, 2, 3, 4, 6, 12]
    assert candidates(16, 2) == [1, 2, 4, 8]


def test_least_recomputation_then_largest_micro_batch() -> None:
    calls: list[tuple[str, int]] = []
    per_row = {NONE: 10 * MB, EVERY: 6 * MB, FULL: 2 * MB}
    mode, size, measured = choose(candidates(16, 1), curve(100 * MB, per_row, calls), 145 * MB)
    # No recomputation fits up to 4 rows (140 MiB); 8 would take 180 MiB.
    assert (mode, size) == (NONE, 4)
    assert all(m.activation_checkpointing == "none" for m in measured)
    assert ("none", 8) in calls  # the size past the choice was measured, not guessed
    assert len(calls) == len(set(calls)) <= 5


def test_recomputation_only_when_nothing_else_fits() -> None:
    calls: list[tuple[str, int]] = []
    per_row = {NONE: 60 * MB, EVERY: 55 * MB, FULL: 10 * MB}
    mode, size, _ = choose(candidates(8, 1), curve(100 * MB, per_row, calls), 150 * MB)
    assert (mode, size) == (FULL, 4)  # one row takes 160 MiB without, 155 MiB with every second block
    assert calls[:2] == [("none", 1), ("every_k", 1)]


def test_every_k_before_full() -> None:
    per_row = {NONE: 60 * MB, EVERY: 20 * MB, FULL: 10 * MB}
    mode, size, _ = choose(candidates(8, 1), curve(100 * MB, per_row, []), 150 * MB)
    assert (mode, size) == (EVERY, 2)


def test_a_curve_that_bends_is_measured_not_extrapolated() -> None:
    """Peaks that grow faster than the line through the first two: each proposal is measured."""

    def measure(mode: ActivationCheckpointing, n: int) -> int:
        return 100 * MB + n * n * MB

    mode, size, measured = choose(candidates(32, 1), measure, 140 * MB)
    assert (mode, size) == (NONE, 4)  # 116 MiB fits, 8 rows take 164 MiB
    assert any(m.micro_batch_size == 8 and not m.fits(140 * MB) for m in measured)


def test_out_of_memory_counts_as_too_large_and_nothing_fitting_is_one_error() -> None:
    def measure(mode: ActivationCheckpointing, n: int) -> int | None:
        return None if n > 1 else 500 * MB

    with pytest.raises(
        ConfigError, match=r"trainer\.memory_probe: even micro-batch 1 with full recomputation"
    ):
        choose(candidates(8, 1), measure, 100 * MB)
    mode, size, measured = choose(candidates(8, 1), lambda m, n: None if n > 2 else MB, 100 * MB)
    assert (mode, size) == (NONE, 2)
    assert any(m.peak_bytes is None for m in measured)


def test_refused_outside_one_device_and_the_decoders_loss(
    corpus_dir: Path, data_cache: Path, tmp_path: Path
) -> None:
    cfg = tiny_config(corpus_dir, data_cache, tmp_path / "run", memory_probe=True)
    with pytest.raises(ConfigError, match=r"trainer\.memory_probe: .*strategy=single.*strategy=ddp"):
        validate_run(replace(cfg, strategy=replace(cfg.strategy, name=StrategyName.ddp)))
    with pytest.raises(ConfigError, match=r"trainer\.memory_budget_gb"):
        validate_run(replace(cfg, trainer=replace(cfg.trainer, memory_budget_gb=0.0)))
    with pytest.raises(ConfigError, match=r"trainer\.memory_headroom"):
        validate_run(replace(cfg, trainer=replace(cfg.trainer, memory_headroom=1.0)))


@pytest.mark.slow
def test_real_measurements_choose_and_the_run_trains_with_the_choice(
    corpus_dir: Path, data_cache: Path, tmp_path: Path
) -> None:
    """On CPU under MemTracker: recomputation lowers the measured peak, a budget between them picks
    the recomputation, and the run with the probe equals one configured with its choice by hand."""
    long_rows = dict(max_steps=4, val_every_n_steps=4, ckpt_every_n_steps=4, log_every_n_steps=1)
    cfg = tiny_config(corpus_dir, data_cache, tmp_path / "probe", memory_probe=True, **long_rows)
    cfg = replace(cfg, model=replace(cfg.model, n_layers=4, max_seq_len=128))
    plan = plan_run(replace(cfg, trainer=replace(cfg.trainer, memory_probe=False)))
    prober = _Prober(plan, torch.device("cpu"))
    plain = [prober.measure(NONE, n) for n in (1, 2)]
    full = [prober.measure(FULL, n) for n in (1, 2)]
    assert all(p is not None for p in plain + full)
    assert full[0] < plain[0] and plain[1] > plain[0] and full[1] > full[0]  # type: ignore[operator]
    # A budget under no-recomputation's single row: recomputation is taken.
    budget_gb = (plain[0] - 1) / (1 << 30)  # type: ignore[operator]
    probed_cfg = replace(cfg, trainer=replace(cfg.trainer, memory_budget_gb=budget_gb))
    result = train(probed_cfg)

    probe = read_result(tmp_path / "probe" / PROBE_FILE)
    assert isinstance(probe, ProbeResult)
    assert probe.activation_checkpointing in ("every_k", "full")
    chosen = [
        m
        for m in probe.measurements
        if (m.activation_checkpointing, m.micro_batch_size)
        == (probe.activation_checkpointing, probe.micro_batch_size)
    ]
    assert chosen and chosen[0].fits(probe.budget_bytes)
    assert not any(
        m.fits(probe.budget_bytes) for m in probe.measurements if m.activation_checkpointing == "none"
    )
    saved = json.loads((tmp_path / "probe" / PROBE_FILE).read_text())
    assert saved["micro_batch_size"] == probe.micro_batch_size
    # The same job, split by hand as the probe chose: the same losses, step for step.
    by_hand = replace(
        cfg,
        run_dir=str(tmp_path / "by-hand"),
        trainer=replace(cfg.trainer, memory_probe=False, micro_batch_size=probe.micro_batch_size),
        strategy=replace(
            cfg.strategy, activation_checkpointing=ActivationCheckpointing(probe.activation_checkpointing)
        ),
    )
    train(by_hand)

    def losses(run: str) -> list[str]:
        with open(tmp_path / run / "metrics.csv", newline="") as f:
            return [r["train/loss"] for r in csv.DictReader(f) if r.get("train/loss")]

    assert losses("probe") == losses("by-hand") and len(losses("probe")) == 4
    assert result.summary["steps"] == 4
