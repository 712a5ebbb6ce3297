"""Throughput across ranks: the slowest rank's window sets tokens/s, the same number on every rank.

Two gloo processes run the real ThroughputCallback; rank 1's window is made twice as long as rank
0's. A synchronous step waits for the slowest rank, so the global tokens/s is all tokens over
rank 1's time; averaging or taking rank 0's time would overstate it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from orchestra.train.callbacks.throughput import ThroughputCallback

TOKENS_PER_STEP, FLOPS_PER_TOKEN, PEAK, LOG_EVERY = 1000, 6e6, 1e12, 4
WINDOW_S = {0: 1.0, 1: 2.0}  # each rank's measured window
DATA_WAIT_S = {0: 0.1, 1: 0.5}


class FakeModule:
    def __init__(self) -> None:
        self.logged: dict[str, float] = {}

    def log(self, key: str, value: float, **kwargs: Any) -> None:
        self.logged[key] = value


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        trainer = SimpleNamespace(
            world_size=2,
            global_step=0,
            precision="32-true",
            strategy=SimpleNamespace(root_device=torch.device("cpu")),
        )
        module = FakeModule()
        cb = ThroughputCallback(
            TOKENS_PER_STEP, FLOPS_PER_TOKEN, LOG_EVERY, peak_flops=PEAK, recompute_factor=4 / 3
        )
        cb.on_fit_start(trainer, module)  # type: ignore[arg-type]
        cb.on_train_batch_start(trainer, module, None, 0)  # type: ignore[arg-type]
        trainer.global_step = LOG_EVERY
        # Pretend this rank's window began WINDOW_S ago and waited DATA_WAIT_S for data.
        cb._window_start = time.perf_counter() - WINDOW_S[rank]
        cb._data_wait = DATA_WAIT_S[rank]
        cb.on_train_batch_end(trainer, module, None, None, 0)  # type: ignore[arg-type]
        Path(out_dir, f"rank{rank}.json").write_text(
            json.dumps({"logged": module.logged, "summary": cb.summary()})
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_tokens_per_s_uses_the_slowest_rank_and_agrees_on_every_rank(tmp_path: Path) -> None:
    # fork: the children inherit the imported modules (a spawn re-imports torch and Lightning, ~5 s).
    mp.start_processes(
        _worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True, start_method="fork"
    )
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]  # one reduced measurement, not one per rank
    m = ranks[0]["logged"]
    slowest = max(WINDOW_S.values())
    tokens_per_s = LOG_EVERY * TOKENS_PER_STEP / slowest
    assert m["perf/tokens_per_s"] == pytest.approx(tokens_per_s, rel=0.02)
    assert m["perf/tokens_per_s_per_device"] == pytest.approx(m["perf/tokens_per_s"] / 2)
    assert m["perf/tflops_per_device"] == pytest.approx(m["perf/tokens_per_s"] / 2 * FLOPS_PER_TOKEN / 1e12)
    assert m["perf/mfu"] == pytest.approx(m["perf/tokens_per_s"] / 2 * FLOPS_PER_TOKEN / PEAK)
    assert m["perf/hfu"] == pytest.approx(m["perf/mfu"] * 4 / 3)
    assert m["perf/data_wait_frac"] == pytest.approx(max(DATA_WAIT_S.values()) / slowest, rel=0.02)
    assert m["system/host_peak_rss_gb"] > 0
    assert ranks[0]["summary"]["tokens_per_s"] == pytest.approx(m["perf/tokens_per_s"])


def test_window_flushes_on_lightning_logging_steps_after_an_odd_resume() -> None:
    """A run resumed at step 7 with log_every 4 reports at 8 (3 steps' window), then every 4."""
    trainer = SimpleNamespace(
        world_size=1,
        global_step=7,
        precision="32-true",
        strategy=SimpleNamespace(root_device=torch.device("cpu")),
    )
    module = FakeModule()
    cb = ThroughputCallback(TOKENS_PER_STEP, FLOPS_PER_TOKEN, LOG_EVERY, peak_flops=PEAK)
    cb.on_fit_start(trainer, module)  # type: ignore[arg-type]
    flushed = []
    for step in range(8, 17):
        cb.on_train_batch_start(trainer, module, None, 0)  # type: ignore[arg-type]
        trainer.global_step = step
        cb.on_train_batch_end(trainer, module, None, None, 0)  # type: ignore[arg-type]
        if module.logged:
            flushed.append(step)
            module.logged = {}
    assert flushed == [8, 12, 16]
    assert cb.train_steps == 9


def test_unknown_device_warns_once_and_reports_no_mfu() -> None:
    """No peak in the table and no trainer.peak_flops: a warning that says how to fix it, and no MFU."""
    trainer = SimpleNamespace(
        world_size=1,
        global_step=0,
        precision="32-true",
        strategy=SimpleNamespace(root_device=torch.device("cpu")),
    )
    module = FakeModule()
    cb = ThroughputCallback(TOKENS_PER_STEP, FLOPS_PER_TOKEN, 1)
    with pytest.warns(UserWarning, match=r"trainer\.peak_flops"):
        cb.on_fit_start(trainer, module)  # type: ignore[arg-type]
    cb.on_train_batch_start(trainer, module, None, 0)  # type: ignore[arg-type]
    trainer.global_step = 1
    cb.on_train_batch_end(trainer, module, None, None, 0)  # type: ignore[arg-type]
    assert "perf/tokens_per_s" in module.logged and "perf/mfu" not in module.logged
    assert cb.summary()["mfu"] is None


def test_counted_mode_sums_the_batches_of_every_step() -> None:
    """tokens_per_step=None (fine-tuning): the positions of the batches actually run."""
    trainer = SimpleNamespace(
        world_size=1,
        global_step=0,
        precision="32-true",
        strategy=SimpleNamespace(root_device=torch.device("cpu")),
    )
    module = FakeModule()
    cb = ThroughputCallback(None, FLOPS_PER_TOKEN, 2, peak_flops=PEAK)
    cb.on_fit_start(trainer, module)  # type: ignore[arg-type]
    widths = [7, 9, 12, 5]
    for step, width in enumerate(widths, start=1):
        cb.on_train_batch_start(trainer, module, None, 0)  # type: ignore[arg-type]
        trainer.global_step = step
        batch = {"tokens": torch.zeros(3, width, dtype=torch.long)}
        cb.on_train_batch_end(trainer, module, None, batch, 0)  # type: ignore[arg-type]
    assert cb.train_tokens == 3 * sum(widths) and cb.summary()["tokens"] == 3 * sum(widths)
