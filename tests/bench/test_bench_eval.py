"""bench/eval_harness.py on a tiny shape: both LMs run every workload, the CSV rows and the equality check.

Speed is not checked (a tiny model on a shared CPU says nothing about it); the numbers are.
"""

from __future__ import annotations

import csv
import importlib
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

TINY = ["--dim", "64", "--layers", "2", "--heads", "4", "--kv-heads", "2", "--ffn", "128", "--seq", "64",
        "--vocab", "512", "--requests", "3", "--documents", "2", "--prompts", "3", "--max-gen-toks", "8",
        "--repeats", "2", "--corpus-chars", "150000", "--threads", "1"]  # fmt: skip


@pytest.fixture(scope="module")
def bench():
    return importlib.import_module("bench.eval_harness")  # bench/ is a package beside tests/


def test_tiny_run_writes_one_checked_row_per_workload(bench, tmp_path: Path) -> None:
    path = tmp_path / "eval_harness.csv"
    threads = torch.get_num_threads()
    try:
        results = bench.main([*TINY, "--csv", str(path), "--out", str(tmp_path / "hf")])
    finally:
        torch.set_num_threads(threads)
    assert [r.workload for r in results] == list(bench.WORKLOADS)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "hf" / name).is_file()

    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == bench.CSV_FIELDS
        rows = list(reader)
    assert [r["workload"] for r in rows] == list(bench.WORKLOADS)
    for row in rows:
        assert row["check"] == "ok" and row["mismatches"] == "0", row
        assert row["device"].startswith("cpu") and row["torch"] == torch.__version__ and row["date"]
        assert row["threads"] == "1" and row["batch_size"] == "16" and row["repeats"] == "2"
        assert "dim=64 layers=2 heads=4 kv_heads=2 ffn=128 seq=64" in row["shape"]
        ours_s, hf_s = float(row["ours_s"]), float(row["hf_s"])
        assert ours_s > 0 and hf_s > 0
        assert float(row["ratio"]) == pytest.approx(hf_s / ours_s, rel=1e-3)
        assert int(row["tokens"]) > 0 and float(row["ours_tokens_per_s"]) > 0
    ll, rolling, gen = rows
    assert (
        int(ll["requests"]) == 3 * bench.CHOICES
        and int(rolling["requests"]) == 2
        and int(gen["requests"]) == 3
    )
    # The equality column: the two backends agree to within the tolerance, not merely "ok".
    assert ll["tolerance"] == "0.0001" and 0 <= float(ll["max_abs_diff"]) <= 1e-4
    assert rolling["tolerance"] == "0.0001/token" and float(rolling["max_abs_diff"]) <= 1e-4 * int(
        rolling["tokens"]
    )
    assert gen["max_abs_diff"] == "" and gen["tolerance"] == "identical text"
    # Rolling documents are longer than the context (several windows each).
    assert int(rolling["tokens"]) > 2 * 64 * 2


def test_compare_fails_loudly_past_the_tolerance(bench) -> None:
    ok = bench.compare("loglikelihood", [(-1.0, False), (-2.0, True)], [(-1.00005, False), (-2.0, True)])
    assert ok == (pytest.approx(5e-5), "0.0001", 0)
    over = bench.compare("loglikelihood", [(-1.0, False), (-2.0, True)], [(-1.001, False), (-2.0, False)])
    assert over[0] == pytest.approx(1e-3) and over[2] == 2  # one |Δ| too large, one greedy flag differs
    # Rolling: 1e-4 per scored token of each document.
    assert bench.compare("loglikelihood_rolling", [-5000.0, -10.0], [-5000.04, -10.0], [1000, 10])[2] == 0
    assert bench.compare("loglikelihood_rolling", [-5000.0, -10.0], [-5000.0, -10.01], [1000, 10])[2] == 1
    assert bench.compare("generate_until", ["a", "b"], ["a", "c"]) == (None, "identical text", 1)
    with pytest.raises(ValueError):
        bench.compare("loglikelihood", [(-1.0, False)], [])

    failed = bench.Result("loglikelihood", 2, 10, [1.0], [2.0], [1.0], [2.0], *over)
    assert not failed.ok and failed.row()["check"] == "FAIL" and failed.ratio == pytest.approx(2.0)
    assert "FAIL" in bench.markdown([failed])


def test_arguments_are_checked(bench) -> None:
    with pytest.raises(SystemExit):
        bench.parse_args(["--repeats", "0"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--seq", "32", "--max-gen-toks", "32"])
    with pytest.raises(Exception, match="n_kv_heads"):
        bench.model_config(bench.parse_args(["--heads", "6", "--kv-heads", "4"]))
