"""Pretraining throughput on one GPU: tokens/s, MFU and peak memory for model presets.

    python bench/pretrain.py                       # debug experiment + llama-125m, bf16, 300 steps
    python bench/pretrain.py --presets llama-350m --steps 200
    python bench/pretrain.py --presets llama-125m --kernels torch triton --steps 200
    python bench/pretrain.py --presets llama-125m --override trainer.precision=bf16-true

Each preset trains on the default corpus (prepared on first use) and the results are printed as
a markdown table (device, date) and appended to bench/results/pretrain.csv, one row per run as it
finishes. Copy the table into docs/benchmarks.md. Throughput is averaged over the logged windows
after the first one, so the warm-up steps (allocator, cudnn autotune, Triton compiles) do not count.

``--kernels torch triton`` runs every preset once per choice of ``model.kernels`` (``auto``, the
config default, picks Triton on CUDA); when both ``torch`` and ``triton`` ran for a preset, the
largest absolute difference of their logged ``train/loss`` (same seed, same data) is printed too.
``--override KEY=VALUE`` (repeatable) passes a Hydra override to every run.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.benchlib import append_csv, compose_check, read_losses  # noqa: E402

PRESETS = {
    # name: overrides on top of experiment=debug
    "debug": [],
    "llama-125m": [
        "model=llama-125m",
        "model.max_seq_len=1024",
        "trainer.micro_batch_size=16",
        "trainer.global_batch_size=16",
        "optim.lr=6e-4",
    ],
    "llama-350m": [
        "model=llama-350m",
        "model.max_seq_len=1024",
        "trainer.micro_batch_size=8",
        "trainer.global_batch_size=8",
        "optim.lr=3e-4",
    ],
}
KERNELS = ["auto", "torch", "triton"]
HEADER = [
    "preset",
    "kernels",
    "params_m",
    "steps",
    "precision",
    "tokens_per_s",
    "mfu",
    "peak_mem_gb",
    "val_loss",
    "error",
]


def run_name(preset: str, kernels: str | None) -> str:
    return preset if kernels is None else f"{preset}-{kernels}"


def train_overrides(
    preset: str, steps: int, run_dir: Path | str, kernels: str | None = None, extra: Sequence[str] = ()
) -> list[str]:
    """The `orchestra-train` overrides of one run (``kernels`` None: the config's model.kernels)."""
    return [
        "experiment=debug",
        *PRESETS[preset],
        *([f"model.kernels={kernels}"] if kernels else []),
        f"trainer.max_steps={steps}",
        f"trainer.val_every_n_steps={steps}",
        "trainer.val_batches=5",
        f"trainer.ckpt_every_n_steps={steps}",
        "trainer.log_every_n_steps=20",
        "scheduler.warmup_steps=20",
        "trainer.progress_bar=false",
        f"name=bench-{run_name(preset, kernels)}",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]


def plan(
    presets: Sequence[str], kernels: Sequence[str] | None, steps: int, out: Path, extra: Sequence[str] = ()
) -> list[tuple[str, str | None, list[str]]]:
    """(preset, kernels, overrides) of every run, preset by preset."""
    choices: Sequence[str | None] = list(kernels) if kernels else [None]
    return [
        (p, k, train_overrides(p, steps, out / run_name(p, k), k, extra)) for p in presets for k in choices
    ]


def max_loss_difference(a: dict[int, float], b: dict[int, float]) -> tuple[float, int] | None:
    """(largest |a - b| over the steps both logged, number of such steps), or None if none is shared."""
    shared = sorted(set(a) & set(b))
    if not shared:
        return None
    return max(abs(a[s] - b[s]) for s in shared), len(shared)


def read_run(run_dir: Path) -> dict[str, Any]:
    summary = json.loads((run_dir / "summary.json").read_text())
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("perf/tokens_per_s")]
    steady = rows[1:] or rows
    tps = sum(float(r["perf/tokens_per_s"]) for r in steady) / len(steady)
    mfu_rows = [float(r["perf/mfu"]) for r in steady if r.get("perf/mfu")]
    return {
        "params_m": round(summary["parameters"] / 1e6, 1),
        "steps": summary["steps"],
        "tokens_per_s": round(tps),
        "mfu": round(sum(mfu_rows) / len(mfu_rows), 4) if mfu_rows else None,
        "peak_mem_gb": None if summary.get("peak_mem_gb") is None else round(summary["peak_mem_gb"], 2),
        "val_loss": summary["val_loss"],
        "precision": summary.get("precision"),
    }


def run(preset: str, kernels: str | None, overrides: list[str], run_dir: Path) -> dict[str, Any]:
    print("$ orchestra-train " + " ".join(overrides), flush=True)
    proc = subprocess.run(
        [sys.executable, "-m", "orchestra.cli.train", *overrides],
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    result: dict[str, Any] = {"preset": preset, "kernels": kernels or "auto"}
    if proc.returncode != 0:
        return {**result, "error": f"exit {proc.returncode}"}
    return {**result, **read_run(run_dir)}


def markdown(results: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for r in results:
        lines.append("| " + " | ".join("-" if r.get(k) is None else str(r[k]) for k in HEADER) + " |")
    return "\n".join(lines)


def kernel_comparison(results: list[dict[str, Any]], out: Path) -> list[str]:
    """For each preset run with both torch and triton: speed-up and the largest train/loss difference."""
    lines = []
    by = {(r["preset"], r["kernels"]): r for r in results}
    for preset in dict.fromkeys(r["preset"] for r in results):
        torch_r, triton_r = by.get((preset, "torch")), by.get((preset, "triton"))
        if not torch_r or not triton_r:
            continue
        diff = max_loss_difference(
            read_losses(out / run_name(preset, "torch")), read_losses(out / run_name(preset, "triton"))
        )
        speed = (
            f"{triton_r['tokens_per_s'] / torch_r['tokens_per_s']:.3f}x tokens/s"
            if torch_r.get("tokens_per_s") and triton_r.get("tokens_per_s")
            else "speed-up: -"
        )
        loss = (
            f"max |train/loss torch - triton| = {diff[0]:.4g} over {diff[1]} logged steps"
            if diff
            else "no train/loss logged by both"
        )
        lines.append(f"{preset}: triton vs torch: {speed}; {loss}")
    return lines


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--presets", nargs="+", default=["debug", "llama-125m"], choices=sorted(PRESETS))
    parser.add_argument(
        "--kernels",
        nargs="+",
        default=None,
        choices=KERNELS,
        help="run every preset once per model.kernels choice (default: the config's)",
    )
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a Hydra override for every run (repeatable)",
    )
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", type=Path, default=None, help="run dirs (default: a temp dir)")
    parser.add_argument("--csv", type=Path, default=ROOT / "bench" / "results" / "pretrain.csv")
    args = parser.parse_args(argv)
    for o in args.override:
        if "=" not in o:
            parser.error(f"--override {o!r}: expected KEY=VALUE")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="orchestra-bench-"))
    runs = plan(args.presets, args.kernels, args.steps, out, args.override)
    for _, _, overrides in runs:  # every command composes and validates before anything trains
        compose_check(overrides)

    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    date = dt.date.today().isoformat()
    results = []
    for preset, kernels, overrides in runs:
        result = run(preset, kernels, overrides, out / run_name(preset, kernels))
        results.append(result)
        append_csv(args.csv, ["date", "device", *HEADER], [{"date": date, "device": device, **result}])
    print(f"\nDevice: {device} — {date} — torch {torch.__version__}\n")
    print(markdown(results))
    for line in kernel_comparison(results, out):
        print(line)
    print(f"\nappended to {args.csv}; run dirs under {out}")


if __name__ == "__main__":
    main()
