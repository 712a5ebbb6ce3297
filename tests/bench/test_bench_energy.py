"""bench/energy.py off the GPU: sample integration, CodeCarbon's file, the table, valid run commands."""

from __future__ import annotations

import csv
import dataclasses
import importlib
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="module")
def bench():
    return importlib.import_module("bench.energy")  # bench/ is a package beside tests/


def test_power_integration_against_hand_values(bench):
    constant = [(float(t), 100.0) for t in range(11)]  # 100 W for 10 s
    assert bench.integrate(constant) == pytest.approx(1000.0)
    ramp = [(t / 10, 10.0 * t / 10) for t in range(101)]  # 0 -> 100 W over 10 s, a sample every 100 ms
    assert bench.integrate(ramp) == pytest.approx(500.0)
    # Windows on and between samples (interpolated ends): 5 W/s * (t1^2 - t0^2).
    assert bench.integrate(ramp, 2.5, 7.5) == pytest.approx(250.0)
    assert bench.integrate(ramp, 2.55, 7.55) == pytest.approx(252.5)
    # Uneven sampling: trapezoids of (0,0)-(1,100) and (1,100)-(4,100) = 50 + 300.
    assert bench.integrate([(0.0, 0.0), (1.0, 100.0), (4.0, 100.0)]) == pytest.approx(350.0)
    # Nothing is extrapolated past the samples.
    assert bench.integrate(constant, -5.0, 15.0) == pytest.approx(1000.0)
    assert bench.integrate(constant, 20.0, 30.0) == 0.0
    assert bench.integrate([(0.0, 5.0)]) == 0.0


def test_counter_delta_interpolates_the_ends(bench):
    counter = [(0.0, 1000.0), (10.0, 2000.0), (20.0, 2500.0)]  # joules since driver load
    assert bench.counter_delta(counter, 2.0, 4.0) == pytest.approx(200.0)
    assert bench.counter_delta(counter, 5.0, 15.0) == pytest.approx(500.0 + 250.0)
    assert bench.counter_delta(counter, -1.0, 30.0) == pytest.approx(1500.0)  # clamped


def _emissions_file(path: Path, rows: list[dict[str, object]]) -> None:
    """An emissions CSV with the installed CodeCarbon's own columns (its EmissionsData fields)."""
    from codecarbon.output_methods.emissions_data import EmissionsData

    fields = [f.name for f in dataclasses.fields(EmissionsData)]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in fields})


def test_reads_codecarbon_emissions_files(bench, tmp_path):
    row = {"duration": 120.5, "gpu_energy": 0.02, "cpu_energy": 0.001, "ram_energy": 0.0005,
           "energy_consumed": 0.0215, "pue": 1.0, "gpu_model": "1 x NVIDIA H200", "codecarbon_version": "3.3.2"}  # fmt: skip
    _emissions_file(tmp_path / "emissions" / "emissions-node0.csv", [row, {**row, "duration": 30.0}])
    _emissions_file(tmp_path / "emissions" / "emissions-node1.csv", [{**row, "gpu_energy": 0.01}])
    cc = bench.read_codecarbon(tmp_path)
    assert cc["rows"] == 3
    assert cc["gpu_kwh"] == pytest.approx(0.05)
    assert cc["node_kwh"] == pytest.approx(3 * 0.0215)
    assert cc["duration_s"] == pytest.approx(120.5)
    assert (cc["pue"], cc["gpu_model"], cc["codecarbon"]) == (1.0, "1 x NVIDIA H200", "3.3.2")
    with pytest.raises(FileNotFoundError, match="energy=codecarbon"):
        bench.read_codecarbon(tmp_path / "nothing")


def test_tracker_window_from_the_callbacks_energy_csv(bench, tmp_path):
    from orchestra.train.callbacks.energy import ENERGY_CSV, ENERGY_FIELDS

    with open(tmp_path / ENERGY_CSV, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=ENERGY_FIELDS)
        writer.writeheader()
        for step, elapsed in ((10, 20.0), (20, 40.0), (25, 52.5)):
            writer.writerow({"time": 1000.0 + elapsed, "elapsed_s": elapsed, "step": step, "kwh": 0.001,
                             "kg_co2eq": 0.0, "power_w": 300.0, "j_per_token": ""})  # fmt: skip
    assert bench.tracker_window(tmp_path) == (pytest.approx(1000.0), pytest.approx(1052.5))


def test_comparison_and_table(bench):
    j = bench.J_PER_KWH
    # 10 s at 360 W: the counter gains 3600 J = 0.001 kWh; power samples read 5 % low.
    times = [t / 10 for t in range(101)]
    samples = bench.Samples(
        energy_j=[(t, 5000.0 + 360.0 * t) for t in times],
        power_w=[(t, 342.0) for t in times],
        instant_w=[],
    )
    codecarbon = {"gpu_kwh": 0.0011, "node_kwh": 0.0013}
    result = bench.compare(samples, (0.0, 10.0), codecarbon)
    assert result["nvml_counter_kwh"] == pytest.approx(3600.0 / j)
    assert result["power_integral_kwh"] == pytest.approx(3420.0 / j)
    assert result["power_over_nvml"] == pytest.approx(0.95)
    assert result["codecarbon_over_nvml"] == pytest.approx(1.1)
    assert result["instant_power_integral_kwh"] is None and result["instant_over_nvml"] is None
    assert result["mean_power_w"] == pytest.approx(360.0)
    assert result["samples"] == 101
    table = bench.markdown({**result, "date": "2026-01-01", "device": "NVIDIA H200", "gpus": 1, "driver": "580",
                            "codecarbon": "3.3.2", "preset": "llama-350m", "steps": 100, "tokens_per_s": 1})  # fmt: skip
    lines = table.splitlines()
    assert lines[0].startswith("Device: 1 x NVIDIA H200 (driver 580) — 2026-01-01")
    assert "| NVML total-energy counter (nvmlDeviceGetTotalEnergyConsumption) | 0.001000 | 1.000 |" in lines
    assert any(
        line.startswith("| NVML power samples") and line.endswith("| 0.000950 | 0.950 |") for line in lines
    )
    assert any(
        line.startswith("| CodeCarbon GPU energy") and line.endswith("| 0.001100 | 1.100 |") for line in lines
    )
    assert not any("instantaneous" in line for line in lines)  # no such samples: no row


def test_append_csv_keeps_old_rows_under_a_new_header(bench, tmp_path):
    path = tmp_path / "r.csv"
    bench.append_csv(path, ["a", "b"], [{"a": 1, "b": 2}])
    bench.append_csv(path, ["a", "b"], [{"a": 3, "b": 4}])
    bench.append_csv(path, ["a", "c"], [{"a": 5, "c": 6}])
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["a", "b", "c"]
        assert [dict(r) for r in reader] == [{"a": "1", "b": "2", "c": ""}, {"a": "3", "b": "4", "c": ""},
                                            {"a": "5", "b": "", "c": "6"}]  # fmt: skip


def test_run_commands_compose_and_validate(bench, tmp_path):
    for preset in bench.PRESETS:
        overrides = bench.train_overrides(preset, 500, tmp_path / preset, ["trainer.precision=bf16-mixed"])
        cfg = bench.compose_check(overrides)
        assert cfg.energy.enabled and cfg.energy.pue == 1.0
        assert cfg.trainer.max_steps == 500 and cfg.trainer.precision == "bf16-mixed"
        assert cfg.model.name == ("debug" if preset == "debug" else preset)
    args = bench.parse_args(["--preset", "llama-1b", "--seconds", "120", "trainer.log_every_n_steps=5"])
    assert (args.preset, args.seconds, args.overrides) == ("llama-1b", 120.0, ["trainer.log_every_n_steps=5"])


def test_tracked_gpus_follow_cuda_visible_devices(bench, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert bench.tracked_gpus(4) == [0, 1, 2, 3]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert bench.tracked_gpus(4) == [2, 3]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_refuses_cleanly_without_cuda(bench, tmp_path):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--out", str(tmp_path)])
    assert "no CUDA GPU" in str(exc.value.code)
