"""bench/mfu.py off the GPU: the default command is the issue's shape with the levers on, the orchestra
row's windows are read right, and a tiny CPU run gives three rows whose HF and torch losses agree."""

from __future__ import annotations

import csv
import importlib
import json
import math
import re
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def bench():
    return importlib.import_module("bench.mfu")  # bench/ is a package beside tests/


def test_default_command_is_llama_1b_at_seq_2048_with_the_levers_on(bench, tmp_path: Path) -> None:
    args = bench.parse_args([])
    assert (args.preset, args.seq, args.micro_batch, args.steps, args.warmup) == ("llama-1b", 2048, 4, 30, 5)
    assert args.loops == ["orchestra", "hf-liger", "torch"]
    overrides = bench.orchestra_overrides(args.preset, args.seq, args.micro_batch, args.steps, args.warmup,
                                          "bf16", "cuda", tmp_path / "run", bench.LEVERS)  # fmt: skip
    cfg = bench.compose_check(overrides)  # the GPU command composes and validates here, on the CPU
    m = cfg.model
    assert (m.dim, m.n_layers, m.n_heads, m.n_kv_heads, m.ffn_dim) == (2048, 16, 32, 8, 8192)
    assert (m.vocab_size, m.max_seq_len, m.tie_embeddings, m.rope_theta) == (128256, 2048, True, 5e5)
    assert cfg.strategy.compile and cfg.optim.fused and m.attention.value == "auto"
    assert cfg.trainer.precision == "bf16-mixed"
    assert cfg.trainer.micro_batch_size == cfg.trainer.global_batch_size == 4
    assert (
        cfg.trainer.max_steps == 35 and cfg.trainer.log_every_n_steps == 5
    )  # whole windows: 1 warm-up, 6 timed


def test_levers_are_on_for_cuda_only_unless_asked(bench) -> None:
    assert bench.resolve(bench.parse_args(["--device", "cpu"])) == ("cpu", "fp32", [])
    assert bench.resolve(bench.parse_args(["--device", "cpu", "--levers"]))[2] == bench.LEVERS
    assert bench.resolve(bench.parse_args(["--device", "cpu", "--no-levers", "--dtype", "bf16"])) == (
        "cpu", "bf16", [],
    )  # fmt: skip
    for bad in (["--warmup", "0"], ["--override", "strategy.compile"], ["--levers", "--no-levers"]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)


def test_orchestra_row_times_the_windows_after_the_warm_up(bench, tmp_path: Path) -> None:
    # warm-up 4, 8 timed steps: windows of gcd(4, 8) = 4 steps, the first one (compiles) left out.
    (tmp_path / "summary.json").write_text(
        json.dumps({"parameters": 5_000_000, "steps": 12, "peak_mem_gb": 3.5})
    )
    with open(tmp_path / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["step", "perf/tokens_per_s", "train/loss"])
        writer.writeheader()
        for step, tps, loss in [(3, 10.0, 8.0), (7, 1000.0, 7.0), (11, 500.0, 6.0)]:
            writer.writerow({"step": step, "perf/tokens_per_s": tps, "train/loss": loss})
        writer.writerow({"step": 11, "perf/tokens_per_s": "", "train/loss": ""})  # a validation row
    raw = bench.read_orchestra_run(tmp_path, warmup=4, steps=8, tokens_per_step=100)
    assert raw["steps_timed"] == 8 and raw["seconds"] == pytest.approx(400 / 1000 + 400 / 500)
    assert (raw["first_loss"], raw["loss_step"], raw["params"]) == (8.0, 4, 5_000_000)
    row = bench.finish_row("orchestra", raw, seq=25, micro_batch=4, steps=8, flops_per_token=1e9, peak=1e12)
    assert row["tokens_per_s"] == pytest.approx(800 / 1.2, rel=1e-4)  # 8 steps x 100 tokens / 1.2 s
    assert row["mfu"] == pytest.approx(800 / 1.2 * 1e9 / 1e12, abs=1e-4)
    assert "8.0000 (step 4)" in bench.markdown([row])


def test_loss_check_flags_different_weights_or_losses(bench) -> None:
    hf = {"loop": "hf-liger", "first_loss": 11.5, "weights_fingerprint": 100.0}
    ours = {"loop": "torch", "first_loss": 11.5 + 2e-5, "weights_fingerprint": 100.0}
    assert bench.loss_check([hf, ours], "fp32")[0]
    assert not bench.loss_check([hf, {**ours, "first_loss": 11.6}], "fp32")[0]
    assert bench.loss_check([hf, {**ours, "first_loss": 11.52}], "bf16")[0]
    assert not bench.loss_check([hf, {**ours, "weights_fingerprint": 100.1}], "fp32")[0]
    ok, lines = bench.loss_check([hf, {"loop": "torch", "error": "exit 1"}], "fp32")
    assert ok and "skipped" in lines[0]


def _table_rows(printed: str) -> dict[str, list[str]]:
    """{loop: its cells} of the printed markdown table."""
    rows = {}
    for line in printed.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] in ("orchestra", "hf-liger", "torch"):
            rows[cells[0]] = cells
    return rows


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_tiny_cpu_run_three_rows_and_hf_matches_our_model(
    bench, tmp_path: Path, corpus_dir: Path, data_cache: Path, capsys
) -> None:
    path = tmp_path / "mfu.csv"
    data = ["data=files", "data.name=tiny-stdlib", f"data.paths=[{corpus_dir}/*.txt]", f"data.cache_dir={data_cache}",
            "data.vocab_size=512", "data.tokenize_workers=1", "data.loader_workers=0"]  # fmt: skip
    code = bench.main(["--preset", "tiny", "--device", "cpu", "--seq", "64", "--micro-batch", "2", "--steps", "2",
                       "--warmup", "1", "--out", str(tmp_path / "out"), "--csv", str(path),
                       *(f"--override={o}" for o in data)])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "Device: cpu" in printed and "transformers" in printed
    assert "liger off (no CUDA)" in printed  # the hf-liger row says it ran plain transformers
    rows = _table_rows(printed)
    assert list(rows) == ["orchestra", "hf-liger", "torch"], printed
    header = bench.HEADER
    for cells in rows.values():
        assert float(cells[header.index("tokens/s")].replace(",", "")) > 0
        assert cells[header.index("params (M)")] == rows["torch"][header.index("params (M)")]  # one shape
        assert cells[header.index("MFU (%)")] == "-" and cells[header.index("peak mem (GiB)")] == "-"  # CPU
    # The independent reference: transformers' Llama and our model, same weights, same batch.
    assert re.search(r"^initial weights: .*: same$", printed, flags=re.M), printed
    match = re.search(
        r"^first-step loss check \(fp32\): hf-liger (\S+) vs torch (\S+): .*: OK$", printed, flags=re.M
    )
    assert match, printed
    hf_loss, torch_loss = float(match[1]), float(match[2])
    assert abs(hf_loss - torch_loss) <= 1e-4 and abs(hf_loss - math.log(4096)) < 1.0  # near ln(V) at init
    with open(path, newline="") as f:
        written = list(csv.DictReader(f))
    assert [r["loop"] for r in written] == ["orchestra", "hf-liger", "torch"]
    assert all(float(r["tokens_per_s"]) > 0 and not r["error"] for r in written)
    assert written[1]["weights_fingerprint"] == written[2]["weights_fingerprint"]
