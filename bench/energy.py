"""Energy accounting against the GPU's own meter: CodeCarbon vs NVML's energy counter vs power samples.

    python bench/energy.py                                  # llama-350m, asked to stop after 150 s
    python bench/energy.py --preset llama-1b --seconds 120
    python bench/energy.py --preset llama-125m --steps 400 trainer.precision=bf16-mixed

One `orchestra-train` job (default tracker: `energy=codecarbon`, PUE forced to 1.0) runs in a
subprocess while a thread here reads, every 100 ms, for every GPU CodeCarbon tracks (those of
CUDA_VISIBLE_DEVICES, all of them when it is unset):

- NVML's total-energy counter, ``nvmlDeviceGetTotalEnergyConsumption`` (mJ since the driver
  loaded; the reference: it is the board's own integrated energy);
- the board power, ``nvmlDeviceGetPowerUsage`` (mW; what `nvidia-smi` shows as power.draw, on
  recent drivers a one-second average), integrated here with the trapezoidal rule;
- where the driver has it, the instantaneous power field (``NVML_FI_DEV_POWER_INSTANT``), integrated
  the same way.

All three are taken over the tracker's own window (it starts at the job's ``on_fit_start`` and
stops at ``on_fit_end``; read from the run dir's energy.csv: last ``time`` minus its ``elapsed_s``),
interpolating the counter at both ends, and compared with CodeCarbon's GPU energy for the run: the
``gpu_energy`` column (kWh) of ``<run_dir>/emissions/emissions-node*.csv``, summed over nodes and
tracker runs. CodeCarbon's whole-node energy (CPU + GPU + RAM, ``energy_consumed``) is shown for
scale. The job is asked to stop (SIGUSR1: checkpoint and stop, orchestra's preemption path) after
``--seconds`` of wall time if it has not reached ``--steps`` by then.

The result is printed as a markdown table (device, date, kWh per meter, ratio to the NVML counter)
and appended to bench/results/energy.csv. Without a CUDA GPU it exits with a message.
"""

from __future__ import annotations

import argparse
import bisect
import csv
import datetime as dt
import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.benchlib import append_csv, compose_check  # noqa: E402

J_PER_KWH = 3.6e6
RESULTS = ROOT / "bench" / "results" / "energy.csv"
# NVML field id of the instantaneous board power (nvml.h: NVML_FI_DEV_POWER_INSTANT); older
# pynvml builds lack the constant.
NVML_FI_DEV_POWER_INSTANT = 186

# Model presets: overrides on top of `experiment=debug` (micro batches sized to keep an H100/H200 busy).
PRESETS: dict[str, list[str]] = {
    "debug": [],
    "llama-125m": ["model=llama-125m", "model.max_seq_len=1024", "trainer.micro_batch_size=16",
                   "trainer.global_batch_size=16", "optim.lr=6e-4"],
    "llama-350m": ["model=llama-350m", "model.max_seq_len=1024", "trainer.micro_batch_size=16",
                   "trainer.global_batch_size=16", "optim.lr=3e-4"],
    "llama-1b": ["model=llama-1b", "model.max_seq_len=2048", "trainer.micro_batch_size=4",
                 "trainer.global_batch_size=4", "optim.lr=3e-4"],
}  # fmt: skip

CSV_FIELDS = [
    "date", "device", "gpus", "driver", "codecarbon", "preset", "steps", "window_s", "mean_power_w",
    "samples", "nvml_counter_kwh", "power_integral_kwh", "instant_power_integral_kwh", "codecarbon_gpu_kwh",
    "codecarbon_node_kwh", "power_over_nvml", "instant_over_nvml", "codecarbon_over_nvml",
    "process_nvml_kwh", "tokens_per_s",
]  # fmt: skip


# --------------------------------------------------------------------------- pure functions


def interpolate(series: Sequence[tuple[float, float]], t: float) -> float:
    """Value of a time-sorted (time, value) series at ``t``: linear between samples, clamped at the ends."""
    if not series:
        raise ValueError("interpolate: empty series")
    times = [s[0] for s in series]
    i = bisect.bisect_left(times, t)
    if i == 0:
        return series[0][1]
    if i == len(series):
        return series[-1][1]
    (t0, v0), (t1, v1) = series[i - 1], series[i]
    return v0 if t1 == t0 else v0 + (v1 - v0) * (t - t0) / (t1 - t0)


def integrate(
    series: Sequence[tuple[float, float]], t0: float | None = None, t1: float | None = None
) -> float:
    """Trapezoidal integral of a time-sorted (seconds, watts) series over [t0, t1], in joules.

    The window defaults to the series' own span; its ends are interpolated, and a window reaching
    past the samples counts only the sampled part (nothing is extrapolated).
    """
    if len(series) < 2:
        return 0.0
    lo = series[0][0] if t0 is None else max(t0, series[0][0])
    hi = series[-1][0] if t1 is None else min(t1, series[-1][0])
    if hi <= lo:
        return 0.0
    points = [(lo, interpolate(series, lo))]
    points += [(t, v) for t, v in series if lo < t < hi]
    points.append((hi, interpolate(series, hi)))
    return sum((b[0] - a[0]) * (a[1] + b[1]) / 2 for a, b in itertools.pairwise(points))


def counter_delta(series: Sequence[tuple[float, float]], t0: float, t1: float) -> float:
    """Increase of a cumulative counter series (time, joules) between ``t0`` and ``t1``, interpolated."""
    return interpolate(series, t1) - interpolate(series, t0)


def tracker_window(run_dir: Path) -> tuple[float, float]:
    """(start, end) unix times of the run's energy tracker, from the last row of its energy.csv.

    The callback writes ``time`` (unix s) and ``elapsed_s`` (since ``on_fit_start``, when the
    tracker starts); its last row is written as the tracker stops.
    """
    path = run_dir / "energy.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no energy.csv (was the run started with energy=codecarbon?)")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{path}: no rows")
    end = float(rows[-1]["time"])
    return end - float(rows[-1]["elapsed_s"]), end


def read_codecarbon(run_dir: Path) -> dict[str, Any]:
    """CodeCarbon's own totals for a run: every ``emissions/emissions-node*.csv`` row, summed.

    kWh columns: ``gpu_energy``, ``cpu_energy``, ``ram_energy`` and ``energy_consumed`` (their sum);
    all already multiplied by the configured PUE (``pue`` column, reported too).
    """
    files = sorted((run_dir / "emissions").glob("emissions-node*.csv"))
    if not files:
        raise FileNotFoundError(f"{run_dir / 'emissions'}: no emissions-node*.csv (energy=codecarbon?)")
    out: dict[str, Any] = {"gpu_kwh": 0.0, "cpu_kwh": 0.0, "ram_kwh": 0.0, "node_kwh": 0.0, "duration_s": 0.0,
                           "rows": 0, "pue": None, "gpu_model": None, "codecarbon": None}  # fmt: skip
    for path in files:
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                out["rows"] += 1
                out["gpu_kwh"] += float(row.get("gpu_energy") or 0.0)
                out["cpu_kwh"] += float(row.get("cpu_energy") or 0.0)
                out["ram_kwh"] += float(row.get("ram_energy") or 0.0)
                out["node_kwh"] += float(row.get("energy_consumed") or 0.0)
                out["duration_s"] = max(out["duration_s"], float(row.get("duration") or 0.0))
                out["pue"] = float(row["pue"]) if row.get("pue") else out["pue"]
                out["gpu_model"] = row.get("gpu_model") or out["gpu_model"]
                out["codecarbon"] = row.get("codecarbon_version") or out["codecarbon"]
    if not out["rows"]:
        raise ValueError(f"{files}: no rows")
    return out


@dataclass
class Samples:
    """What the sampler thread read: per tick the time and the sums over the tracked GPUs."""

    energy_j: list[tuple[float, float]] = field(default_factory=list)  # cumulative counter
    power_w: list[tuple[float, float]] = field(default_factory=list)
    instant_w: list[tuple[float, float]] = field(default_factory=list)


def compare(samples: Samples, window: tuple[float, float], codecarbon: dict[str, Any]) -> dict[str, Any]:
    """The three GPU meters over the tracker's window, in kWh, and their ratios to the NVML counter."""
    t0, t1 = window
    nvml = counter_delta(samples.energy_j, t0, t1) / J_PER_KWH
    power = integrate(samples.power_w, t0, t1) / J_PER_KWH
    instant = integrate(samples.instant_w, t0, t1) / J_PER_KWH if len(samples.instant_w) > 1 else None

    def ratio(x: float | None) -> float | None:
        return None if x is None or nvml <= 0 else round(x / nvml, 4)

    inside = [s for s in samples.power_w if t0 <= s[0] <= t1]
    return {
        "window_s": round(t1 - t0, 2),
        "samples": len(inside),
        "mean_power_w": round(nvml * J_PER_KWH / (t1 - t0), 1) if t1 > t0 else None,
        "nvml_counter_kwh": nvml,
        "power_integral_kwh": power,
        "instant_power_integral_kwh": instant,
        "codecarbon_gpu_kwh": codecarbon["gpu_kwh"],
        "codecarbon_node_kwh": codecarbon["node_kwh"],
        "power_over_nvml": ratio(power),
        "instant_over_nvml": ratio(instant),
        "codecarbon_over_nvml": ratio(codecarbon["gpu_kwh"]),
        "process_nvml_kwh": (samples.energy_j[-1][1] - samples.energy_j[0][1]) / J_PER_KWH
        if samples.energy_j else None,
    }  # fmt: skip


def _kwh(x: float | None) -> str:
    return "-" if x is None else f"{x:.6f}"


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def markdown(result: dict[str, Any]) -> str:
    """The comparison as a markdown table, one line per meter, with device and date above it."""
    r = result
    lines = [
        f"Device: {r['gpus']} x {r['device']} (driver {r['driver']}) — {r['date']} — CodeCarbon {r['codecarbon']}",
        f"Run: {r['preset']}, {r['steps']} steps; tracker window {r['window_s']} s, mean GPU power "
        f"{r['mean_power_w']} W (NVML counter), {r['samples']} power samples in the window",
        "",
        "| meter (tracker window) | GPU kWh | ratio to NVML counter |",
        "|---|---|---|",
        f"| NVML total-energy counter (nvmlDeviceGetTotalEnergyConsumption) | {_kwh(r['nvml_counter_kwh'])} | 1.000 |",
        f"| NVML power samples every 100 ms, integrated (nvmlDeviceGetPowerUsage) | "
        f"{_kwh(r['power_integral_kwh'])} | {_ratio(r['power_over_nvml'])} |",
    ]
    if r.get("instant_power_integral_kwh") is not None:
        lines.append(
            f"| NVML instantaneous power samples, integrated (NVML_FI_DEV_POWER_INSTANT) | "
            f"{_kwh(r['instant_power_integral_kwh'])} | {_ratio(r['instant_over_nvml'])} |"
        )
    lines += [
        f"| CodeCarbon GPU energy (emissions-node*.csv gpu_energy) | {_kwh(r['codecarbon_gpu_kwh'])} | "
        f"{_ratio(r['codecarbon_over_nvml'])} |",
        "",
        f"For scale: CodeCarbon whole node (CPU + GPU + RAM) {_kwh(r['codecarbon_node_kwh'])} kWh; NVML counter "
        f"over the whole subprocess (start-up and exit included) {_kwh(r['process_nvml_kwh'])} kWh.",
    ]
    return "\n".join(lines)


def train_overrides(preset: str, steps: int, run_dir: Path | str, extra: Sequence[str] = ()) -> list[str]:
    """The `orchestra-train` overrides of the measured run."""
    return [
        "experiment=debug",
        *PRESETS[preset],
        f"trainer.max_steps={steps}",
        f"trainer.val_every_n_steps={steps}",
        "trainer.val_batches=2",
        f"trainer.ckpt_every_n_steps={steps}",
        "trainer.keep_last_checkpoints=1",
        "trainer.log_every_n_steps=10",
        "scheduler.warmup_steps=20",
        "trainer.progress_bar=false",
        "trainer.sample_tokens=8",
        "energy=codecarbon",
        "energy.pue=1.0",
        f"name=bench-energy-{preset}",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]


def tracked_gpus(count: int) -> list[int]:
    """NVML indices of the GPUs CodeCarbon tracks: CUDA_VISIBLE_DEVICES (numeric ids), else all."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None or not visible.strip():
        return list(range(count))
    ids = [v.strip() for v in visible.split(",") if v.strip()]
    if all(v.isdigit() for v in ids):
        return [int(v) for v in ids if int(v) < count]
    return list(range(count))  # UUIDs: not mapped here; every GPU is read


def _text(s: Any) -> str:
    return s.decode() if isinstance(s, bytes) else str(s)


def field_value(value: Any) -> float:
    """The number in an nvmlFieldValue_t, whatever its type (nvml.h's nvmlValueType_t order)."""
    member = {0: "dVal", 1: "uiVal", 2: "ulVal", 3: "ullVal", 4: "sllVal", 5: "siVal"}.get(
        int(value.valueType), "uiVal"
    )
    return float(getattr(value.value, member))


class Sampler(threading.Thread):
    """Reads the counter and power of the tracked GPUs every ``interval`` seconds until stopped."""

    def __init__(self, interval: float = 0.1) -> None:
        super().__init__(daemon=True)
        import pynvml

        self.nvml = pynvml
        pynvml.nvmlInit()
        self.handles = [
            pynvml.nvmlDeviceGetHandleByIndex(i) for i in tracked_gpus(pynvml.nvmlDeviceGetCount())
        ]
        self.interval = interval
        self.samples = Samples()
        self._stop_event = threading.Event()
        self._instant = True

    def _instant_w(self) -> float | None:
        if not self._instant:
            return None
        try:
            total = 0.0
            for h in self.handles:
                (value,) = self.nvml.nvmlDeviceGetFieldValues(h, [NVML_FI_DEV_POWER_INSTANT])
                if value.nvmlReturn != 0:
                    raise RuntimeError(value.nvmlReturn)
                total += field_value(value) / 1000.0  # mW
            return total
        except Exception:
            self._instant = False  # not supported by this driver / GPU
            return None

    def sample(self) -> None:
        now = time.time()
        nv = self.nvml
        energy = sum(nv.nvmlDeviceGetTotalEnergyConsumption(h) for h in self.handles) / 1000.0
        power = sum(nv.nvmlDeviceGetPowerUsage(h) for h in self.handles) / 1000.0
        self.samples.energy_j.append((now, energy))
        self.samples.power_w.append((now, power))
        instant = self._instant_w()
        if instant is not None:
            self.samples.instant_w.append((now, instant))

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.sample()
            self._stop_event.wait(self.interval)

    def stop(self) -> Samples:
        self._stop_event.set()
        self.join()
        self.sample()
        return self.samples

    def device_info(self) -> tuple[str, str]:
        name = self.nvml.nvmlDeviceGetName(self.handles[0])
        driver = self.nvml.nvmlSystemGetDriverVersion()
        return _text(name), _text(driver)


def run_and_sample(
    cmd: list[str], run_dir: Path, seconds: float, interval: float
) -> tuple[int, Samples, Sampler]:
    """Start the job, sample while it runs, ask it to stop after ``seconds`` once training has begun."""
    sampler = Sampler(interval)
    sampler.start()
    started = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    asked = False
    try:
        while proc.poll() is None:
            if not asked and time.time() - started > seconds and (run_dir / "energy.csv").is_file():
                print(
                    f"bench/energy.py: {seconds:.0f} s passed; asking the job to stop (SIGUSR1)", flush=True
                )
                proc.send_signal(signal.SIGUSR1)
                asked = True
            time.sleep(0.2)
    except BaseException:
        proc.kill()
        raise
    finally:
        samples = sampler.stop()
    return proc.returncode, samples, sampler


def tokens_per_s(run_dir: Path) -> float | None:
    """Mean perf/tokens_per_s of metrics.csv's logged windows after the first (warm-up)."""
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return None
    with open(path, newline="") as f:
        values = [float(r["perf/tokens_per_s"]) for r in csv.DictReader(f) if r.get("perf/tokens_per_s")]
    steady = values[1:] or values
    return round(sum(steady) / len(steady)) if steady else None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="llama-350m", choices=sorted(PRESETS))
    parser.add_argument(
        "--steps", type=int, default=5000, help="upper bound on steps (the run usually stops on time)"
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=150.0,
        help="wall seconds (start-up included) after which the job is asked to stop",
    )
    parser.add_argument("--interval", type=float, default=0.1, help="sampling period, seconds")
    parser.add_argument("--out", type=Path, default=None, help="run dir parent (default: a temp dir)")
    parser.add_argument("--csv", type=Path, default=RESULTS, help="results CSV (appended)")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for the job")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be at least 2")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="orchestra-energy-"))
    run_dir = out / f"energy-{args.preset}"
    overrides = train_overrides(args.preset, args.steps, run_dir, args.overrides)
    compose_check(overrides)  # a bad command fails here, before the GPU is touched

    import torch

    if not torch.cuda.is_available():
        sys.exit("bench/energy.py compares GPU energy meters; this machine has no CUDA GPU (nothing was run)")
    try:
        import pynvml  # noqa: F401  (nvidia-ml-py, a CodeCarbon requirement)
    except ImportError:
        sys.exit("bench/energy.py needs pynvml (pip install nvidia-ml-py)")

    from orchestra.train.callbacks.preemption import PREEMPTED_EXIT_CODE

    cmd = [sys.executable, "-m", "orchestra.cli.train", *overrides]
    print("$ orchestra-train " + " ".join(overrides), flush=True)
    code, samples, sampler = run_and_sample(cmd, run_dir, args.seconds, args.interval)
    if code not in (0, PREEMPTED_EXIT_CODE):
        sys.exit(f"bench/energy.py: the training job failed (exit {code}); run dir {run_dir}")
    device, driver = sampler.device_info()
    codecarbon = read_codecarbon(run_dir)
    window = tracker_window(run_dir)
    with open(run_dir / "energy.csv", newline="") as f:
        steps = int(float(list(csv.DictReader(f))[-1]["step"]))
    result = {
        "date": dt.date.today().isoformat(),
        "device": device,
        "gpus": len(sampler.handles),
        "driver": driver,
        "codecarbon": codecarbon["codecarbon"],
        "preset": args.preset,
        "steps": steps,
        "tokens_per_s": tokens_per_s(run_dir),
        **compare(samples, window, codecarbon),
    }
    print("\n" + markdown(result) + "\n")
    if (run_dir / "summary.json").is_file():
        summary = json.loads((run_dir / "summary.json").read_text())
        print(
            f"Run summary: tokens/s {summary.get('tokens_per_s')}, MFU {summary.get('mfu')}, "
            f"peak memory {summary.get('peak_mem_gb')} GiB, energy {summary.get('energy_kwh')} kWh"
        )
    append_csv(args.csv, CSV_FIELDS, [result])
    print(f"appended to {args.csv}; run dir {run_dir}")


if __name__ == "__main__":
    main()
