"""bench/serve_load.py on a tiny shape: every level answers, the queue level gets clean 429s, the CSV rows.

Speed is not checked (a tiny model on a shared CPU says nothing about it); the numbers are.
"""

from __future__ import annotations

import csv
import importlib
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

TINY = ["--dim", "64", "--layers", "2", "--heads", "4", "--kv-heads", "2", "--ffn", "128", "--seq", "96",
        "--vocab", "400", "--corpus-chars", "100000", "--concurrency", "1", "4", "--baseline-concurrency", "4",
        "--requests", "8", "--max-tokens", "8", "--threads", "1"]  # fmt: skip


def test_tiny_load_run(tmp_path: Path) -> None:
    bench = importlib.import_module("bench.serve_load")
    path = tmp_path / "serve.csv"
    levels = bench.main([*TINY, "--csv", str(path)])
    assert [(lv.server, lv.concurrency) for lv in levels] == [
        ("batched", 1), ("batched", 4), ("one-at-a-time", 4), ("queue", 64)
    ]  # fmt: skip
    for lv in levels[:3]:
        row = lv.row()
        assert row["ok"] == lv.requests and row["rejected_429"] == 0 and row["other_errors"] == 0
        assert 0 < row["ttft_p50_s"] <= row["latency_p50_s"] <= row["latency_p99_s"]
        assert row["completion_tokens"] == 8 * lv.requests or row["completion_tokens"] > 0
    queue = levels[3].row()
    assert (
        queue["rejected_429"] > 0
        and queue["other_errors"] == 0
        and queue["ok"] + queue["rejected_429"] == 256
    )
    assert levels[1].row()["mean_batch"] > 1.0  # four clients really shared decode steps
    assert bench.continuous_ratio(levels, 4) > 0
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and rows[0]["server"] == "batched" and rows[0]["device"].startswith("cpu")
