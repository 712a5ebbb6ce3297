"""Pretraining throughput on one GPU: tokens/s, MFU and peak memory for model presets.

    python bench/pretrain.py                       # debug experiment + llama-125m, bf16, 300 steps
    python bench/pretrain.py --presets llama-350m --steps 200

Each preset trains on the default corpus (prepared on first use) and the results are printed as
a markdown table (device, date) and appended to bench/results/pretrain.csv. Copy the table into
docs/benchmarks.md. Throughput is averaged over the logged windows after the first one, so the
warm-up steps (allocator, cudnn autotune) do not count.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PRESETS = {
    # name: overrides on top of experiment=debug
    "debug": [],
    "llama-125m": ["model=llama-125m", "model.max_seq_len=1024", "trainer.micro_batch_size=16",
                   "trainer.global_batch_size=16", "optim.lr=6e-4"],
    "llama-350m": ["model=llama-350m", "model.max_seq_len=1024", "trainer.micro_batch_size=8",
                   "trainer.global_batch_size=8", "optim.lr=3e-4"],
}


def run(preset: str, steps: int, out: Path) -> dict:
    run_dir = out / preset
    cmd = [sys.executable, "-m", "orchestra.cli.train", "experiment=debug", *PRESETS[preset],
           f"trainer.max_steps={steps}", f"trainer.val_every_n_steps={steps}", "trainer.val_batches=5",
           f"trainer.ckpt_every_n_steps={steps}", "trainer.log_every_n_steps=20",
           "scheduler.warmup_steps=20", "trainer.progress_bar=false", f"name=bench-{preset}",
           f"hydra.run.dir={run_dir}"]
    subprocess.run(cmd, check=True, cwd=ROOT)
    summary = json.loads((run_dir / "summary.json").read_text())
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("perf/tokens_per_s")]
    steady = rows[1:] or rows
    tps = sum(float(r["perf/tokens_per_s"]) for r in steady) / len(steady)
    mfu_rows = [float(r["perf/mfu"]) for r in steady if r.get("perf/mfu")]
    return {
        "preset": preset,
        "params_m": round(summary["parameters"] / 1e6, 1),
        "steps": summary["steps"],
        "tokens_per_s": round(tps),
        "mfu": round(sum(mfu_rows) / len(mfu_rows), 4) if mfu_rows else None,
        "peak_mem_gb": None if summary.get("peak_mem_gb") is None else round(summary["peak_mem_gb"], 2),
        "val_loss": summary["val_loss"],
        "precision": summary.get("precision"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["debug", "llama-125m"], choices=sorted(PRESETS))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", type=Path, default=None, help="run dirs (default: a temp dir)")
    args = parser.parse_args()

    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    out = args.out or Path(tempfile.mkdtemp(prefix="orchestra-bench-"))
    results = [run(p, args.steps, out) for p in args.presets]
    date = dt.date.today().isoformat()
    header = ["preset", "params_m", "steps", "precision", "tokens_per_s", "mfu", "peak_mem_gb", "val_loss"]
    print(f"\nDevice: {device} — {date} — torch {torch.__version__}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in results:
        print("| " + " | ".join("-" if r[k] is None else str(r[k]) for k in header) + " |")
    csv_path = ROOT / "bench" / "results" / "pretrain.csv"
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    new = not csv_path.exists()
    with open(csv_path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["date", "device", *header])
        if new:
            writer.writeheader()
        for r in results:
            writer.writerow({"date": date, "device": device, **{k: r[k] for k in header}})


if __name__ == "__main__":
    main()
