"""Checkpoint stall: how long training waits for a save, synchronous vs strategy.async_checkpoint.

    python bench/checkpoint.py                       # 2 ranks (gloo on CPU), 2 rounds
    python bench/checkpoint.py --nproc 8 --device gpu --dim 2048 --layers 16   # one GPU node

Each run is orchestra-train under torchrun with strategy=fsdp on the same model and data,
checkpointing every ``--every`` steps (``--steps / --every`` saves, plus the final one). The
strategy times the training loop's wait in every ``save_checkpoint`` call (rank 0; summary.json
``checkpoint_stall_s``): a synchronous save waits for every shard to be written, hashed and
renamed; an async one only for DCP to stage the state in host memory, the files being written by
a background thread while the next steps run. The runs of a round alternate (sync, async), and
the table reports each run's stall per save and its wall time. The losses of the two must be
equal (the script exits 1 otherwise). Rows go to bench/results/checkpoint_<device>.csv.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.benchlib import append_csv, compose_check, read_losses  # noqa: E402

FIELDS = [
    "date", "device", "nproc", "round", "mode", "parameters", "steps", "saves", "stall_s", "stall_per_save_s",
    "wall_s", "checkpoint_mb",
]  # fmt: skip


def overrides(args: argparse.Namespace, run_dir: Path, mode: str) -> list[str]:
    return [
        "experiment=debug",
        f"model.dim={args.dim}",
        f"model.n_layers={args.layers}",
        f"model.n_heads={args.dim // 64}",
        f"model.n_kv_heads={max(1, args.dim // 128)}",
        f"model.ffn_dim={int(args.dim * 8 / 3) // 64 * 64}",
        "model.max_seq_len=256",
        f"trainer.devices={args.nproc}",
        f"trainer.accelerator={args.device}",
        "strategy=fsdp",
        f"strategy.async_checkpoint={'true' if mode == 'async' else 'false'}",
        f"trainer.max_steps={args.steps}",
        f"trainer.ckpt_every_n_steps={args.every}",
        "trainer.keep_last_checkpoints=2",
        f"trainer.micro_batch_size={args.micro}",
        f"trainer.global_batch_size={args.micro * args.nproc}",
        "trainer.val_every_n_steps=1000000",
        "trainer.val_batches=1",
        "trainer.sample_tokens=0",
        "trainer.progress_bar=false",
        "energy=none",
        "resume=never",
        "name=bench-checkpoint",
        f"hydra.run.dir={run_dir}",
    ]


def run(args: argparse.Namespace, run_dir: Path, mode: str) -> dict[str, Any]:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
        "-m", "orchestra.cli.train", *overrides(args, run_dir, mode),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    started = time.perf_counter()
    with open(run_dir.parent / f"{run_dir.name}.log", "wb") as log:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"{mode} run failed; see {run_dir.parent / (run_dir.name + '.log')}")
    summary = json.loads((run_dir / "summary.json").read_text())
    saves = args.steps // args.every
    last = run_dir / "checkpoints" / "last.ckpt"
    size = sum(p.stat().st_size for p in last.rglob("*") if p.is_file()) / 2**20
    stall = float(summary["checkpoint_stall_s"])
    return {
        "mode": mode,
        "parameters": summary["parameters"],
        "steps": args.steps,
        "saves": saves,
        "stall_s": round(stall, 4),
        "stall_per_save_s": round(stall / saves, 4),
        "wall_s": round(wall, 2),
        "checkpoint_mb": round(size, 1),
        "losses": read_losses(run_dir),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--micro", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        compose_check(
            [o for o in overrides(args, Path(tmp) / "check", "async") if not o.startswith("hydra.")]
        )
    date = dt.date.today().isoformat()
    device = platform.processor() or platform.machine() if args.device == "cpu" else "gpu"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            results = {mode: run(args, Path(tmp) / f"{mode}-{r}", mode) for mode in ("sync", "async")}
            if results["sync"]["losses"] != results["async"]["losses"]:
                sys.exit(f"round {r}: the losses of the sync and async runs differ")
            for result in results.values():
                result.pop("losses")
                rows.append({"date": date, "device": device, "nproc": args.nproc, "round": r, **result})
    append_csv(ROOT / "bench" / "results" / f"checkpoint_{args.device}.csv", FIELDS, rows)
    print("| round | mode | parameters | saves | checkpoint MB | stall per save s | run wall s |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['round']} | {row['mode']} | {row['parameters']:,} | {row['saves']} | {row['checkpoint_mb']} "
            f"| {row['stall_per_save_s']} | {row['wall_s']} |"
        )


if __name__ == "__main__":
    main()
