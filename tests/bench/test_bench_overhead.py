"""bench/overhead.py without timing anything: the run order, the ratio arithmetic, valid commands."""

from __future__ import annotations

import csv
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.overhead import Timing


@pytest.fixture(scope="module")
def bench():
    return importlib.import_module("bench.overhead")  # bench/ is a package beside tests/


class FakeRunner:
    """Wall time = start-up + steps x seconds per step, per kind and round; records the call order.

    CPU time is the wall time of a run that had both cores to itself: twice the wall.
    """

    def __init__(self, per_step: dict[str, list[float]], startup: float = 5.0) -> None:
        self.per_step, self.startup = per_step, startup
        self.calls: list[tuple[str, int, int]] = []

    def __call__(self, kind: str, steps: int, r: int) -> Timing:
        self.calls.append((kind, steps, r))
        wall = self.startup + steps * self.per_step[kind][r]
        return Timing(wall, 2 * wall)


def test_runs_are_interleaved_round_by_round(bench) -> None:
    runner = FakeRunner({"bare": [1.0, 1.0, 1.0], "orchestra": [1.0, 1.0, 1.0]})
    bench.measure(runner, rounds=3, short=2, long=5, tokens_per_step=10)
    assert runner.calls == [
        (kind, steps, r) for r in range(3) for kind in ("bare", "orchestra") for steps in (2, 5)
    ]


def test_ratio_is_the_median_of_per_round_ratios_with_start_up_cancelled(bench) -> None:
    # Round 1 is slow for both sides (machine busy): its ratio is still 0.8, and the start-up
    # (the same 5 s in every run, or any value) never enters the tokens/s.
    runner = FakeRunner({"bare": [1.0, 3.0, 1.0], "orchestra": [1.25, 3.75, 1.0]}, startup=7.0)
    rounds = bench.measure(runner, rounds=3, short=1, long=4, tokens_per_step=100)
    assert [r.tokens_per_s("bare") for r in rounds] == pytest.approx([100.0, 100 / 3, 100.0])
    assert [r.ratio for r in rounds] == pytest.approx([0.8, 0.8, 1.0])
    assert bench.median_ratio(rounds) == pytest.approx(0.8)
    assert bench.median_cpu_ratio(rounds) == pytest.approx(0.8)  # CPU seconds: the same ratio here
    row = rounds[0].row()
    assert (row["bare_short_s"], row["bare_long_s"], row["orchestra_long_s"]) == (8.0, 11.0, 12.0)
    assert row["ratio"] == pytest.approx(0.8)
    assert row["orchestra_long_cpu_s"] == 24.0 and row["cpu_ratio"] == pytest.approx(0.8)
    assert "| median | | | 0.800 | 0.800 |" in bench.markdown(rounds)


def test_cpu_ratio_is_absent_when_a_run_has_no_cpu_time(bench) -> None:
    timings = {(k, n): Timing(n * 1.0) for k in ("bare", "orchestra") for n in (1, 2)}
    r = bench.Round(0, 1, 2, 10, timings)
    assert r.ratio == pytest.approx(1.0) and r.cpu_ratio is None
    assert bench.median_cpu_ratio([r]) is None and r.row()["cpu_ratio"] is None


def test_a_run_no_longer_than_the_short_one_is_refused(bench) -> None:
    runner = FakeRunner({"bare": [0.0], "orchestra": [1.0]})
    (r,) = bench.measure(runner, rounds=1, short=1, long=3, tokens_per_step=1)
    with pytest.raises(ValueError, match="bare"):
        _ = r.ratio
    with pytest.raises(ValueError):
        bench.measure(runner, rounds=1, short=3, long=3, tokens_per_step=1)


def test_overrides_make_the_same_valid_run_at_both_lengths(bench, tmp_path: Path) -> None:
    for steps in (10, 70):
        cfg = bench.compose_check(bench.train_overrides(steps, tmp_path / "run"))
        t = cfg.trainer
        assert t.max_steps == steps and (t.micro_batch_size, t.global_batch_size) == (16, 16)
        assert (cfg.model.name, cfg.model.max_seq_len, t.precision, t.grad_clip) == (
            "debug",
            256,
            "32-true",
            1.0,
        )
        # Mid-run validation and checkpoints fall past the run: only the end-of-run ones, in both.
        assert t.val_every_n_steps > 70 and t.ckpt_every_n_steps > 70
        assert t.progress_bar and not cfg.energy.enabled


def test_bare_worker_trains_the_configured_model(bench, corpus_dir: Path, data_cache: Path) -> None:
    """The reference loop itself, on a shrunken model and the tests' small corpus (its overrides
    apply to both sides); it reads the prepared dataset as the orchestra run does."""
    small = ["model.dim=32", "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=1",
             "model.ffn_dim=64", "model.max_seq_len=16", "trainer.micro_batch_size=2",
             "trainer.global_batch_size=4", "data=files", "data.name=tiny-stdlib",
             f"data.paths=[{corpus_dir}/*.txt]", f"data.cache_dir={data_cache}", "data.vocab_size=512",
             "data.tokenize_workers=1"]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "bench/overhead.py", "--bare-worker", "6", "--threads", "1",
         *(f"--override={o}" for o in small)],
        cwd=Path(bench.__file__).resolve().parents[1], capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["steps"] == 6 and 0 < out["loss"] < 10  # two micro-batches per step (global 4 = 2 x 2)


def test_results_csv_has_one_row_per_round(bench, tmp_path: Path) -> None:
    runner = FakeRunner({"bare": [1.0, 1.0], "orchestra": [1.1, 1.2]})
    rounds = bench.measure(runner, rounds=2, short=10, long=70, tokens_per_step=4096)
    path = tmp_path / "overhead.csv"
    bench.append_csv(
        path, bench.CSV_FIELDS, [{"date": "d", "device": "cpu", "threads": 2, **r.row()} for r in rounds]
    )
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["ratio"]) for r in rows] == pytest.approx([1 / 1.1, 1 / 1.2], abs=1e-4)
    assert float(rows[0]["bare_tokens_per_s"]) == pytest.approx(4096.0)
