"""Strategies side by side: tokens/s, MFU and peak memory per rank for one model preset.

GPU run (one node; each strategy is a fresh torchrun job on all local GPUs):

    python bench/scaling.py --preset llama-1b --strategies single fsdp deepspeed_zero2 deepspeed_zero3 --steps 100

Rows are also appended to bench/results/scaling.csv.

Memory table from orchestra-plan's model (any machine, no GPU needed) — what docs/scaling.md shows:

    python bench/scaling.py --memory --gpus 8
    python bench/scaling.py --anchors          # the time model against published runs

Every GPU row also records what orchestra-plan predicted for the same command line (peak memory
without the CUDA/NCCL overhead, tokens/s per GPU), so the plan is checked against each run.
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PRESETS = ["debug", "llama-125m", "llama-350m", "llama-1b", "llama-3b", "llama-8b"]
STRATEGIES = [
    "single",
    "ddp",
    "fsdp",
    "deepspeed_zero1",
    "deepspeed_zero2",
    "deepspeed_zero3",
    "deepspeed_zero3_offload",
]


def plan_of(overrides: list[str], gpu: str = "h100-80gb"):  # -> orchestra.train.sizing.Plan
    """orchestra-plan's prediction for a training command line (the same composition as orchestra-train)."""
    from orchestra.cli.plan import compose_train_config
    from orchestra.config import PlanConfig
    from orchestra.train.sizing import plan_job

    return plan_job(compose_train_config(overrides), PlanConfig(gpu=gpu))


def predicted_peak_gib(plan) -> float:  # plan: orchestra.train.sizing.Plan
    """What torch.cuda.max_memory_allocated should reach: the plan's total without the CUDA/NCCL overhead."""
    return sum(r.bytes for r in plan.memory.rows if r.key != "overhead") / 2**30


def memory_table(gpus: int, micro_batch: int, seq: int | None, gpu: str = "h100-80gb") -> str:
    """GiB per rank of every preset under each strategy, as orchestra-plan predicts them."""
    from orchestra.train.sizing import parameter_count

    strategies = ["ddp", "deepspeed_zero1", "deepspeed_zero2", "deepspeed_zero3", "fsdp"]
    lines = [
        f"GiB per rank on {gpus} x {gpu} (trainer.precision=bf16-mixed, AdamW, model.kernels=auto),",
        f"micro batch {micro_batch}, no recomputation / full recomputation; orchestra-plan's model.",
        "",
        "| preset | params | "
        + " | ".join(strategies)
        + " | fsdp + full recompute | fsdp tokens/s per GPU |",
        "|---|---|" + "---|" * (len(strategies) + 2),
    ]
    for name in PRESETS:
        common = [
            f"model={name}",
            f"trainer.devices={gpus}",
            f"trainer.micro_batch_size={micro_batch}",
            f"trainer.global_batch_size={micro_batch * gpus}",
            "trainer.accelerator=gpu",
            *([f"model.max_seq_len={seq}"] if seq else []),
        ]
        plans = [plan_of([*common, f"strategy={st}"], gpu) for st in strategies]
        recomputed = plan_of([*common, "strategy=fsdp", "strategy.activation_checkpointing=full"], gpu)
        params = plans[0].assessment.shape
        cells = [f"{p.memory.total / 2**30:.1f}" for p in [*plans, recomputed]]
        lines.append(
            f"| {name} (s={params.seq}) | {parameter_count(params.model, params.vocab) / 1e9:.2f} B | "
            + " | ".join(cells)
            + f" | {plans[-1].time.tokens_per_s_per_gpu:,.0f} |"
        )
    return "\n".join(lines)


def anchors_table() -> str:
    """orchestra-plan's time model against the published runs it is calibrated on and checked against."""
    from orchestra.train.sizing import anchor_results

    lines = [
        "| run | source | role | published tokens/s/GPU | planned | error |",
        "|---|---|---|---|---|---|",
    ]
    for r in anchor_results():
        a = r.anchor
        source = "torchtitan" if "torchtitan" in a.source else "llm-foundry"
        lines.append(
            f"| {a.name} | {source} | {a.role} | {a.published:,.0f} | {r.predicted:,.0f} | "
            f"{r.predicted / a.published - 1:+.1%} |"
        )
    return "\n".join(lines)


def run_strategy(
    preset_name: str, strategy: str, steps: int, gpus: int, out: Path, extra: list[str], plan_gpu: str
) -> dict:
    run_dir = out / strategy
    world = 1 if strategy == "single" else gpus
    launcher = (
        [sys.executable, "-m", "orchestra.cli.train"]
        if world == 1
        else [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={world}",
            "-m",
            "orchestra.cli.train",
        ]
    )
    cmd = [
        *launcher,
        "experiment=debug",
        f"model={preset_name}",
        f"strategy={strategy}",
        f"trainer.devices={world}",
        f"trainer.max_steps={steps}",
        f"trainer.val_every_n_steps={steps}",
        "trainer.val_batches=2",
        f"trainer.ckpt_every_n_steps={steps}",
        "trainer.log_every_n_steps=10",
        "scheduler.warmup_steps=10",
        "trainer.progress_bar=false",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]
    plan = plan_of(cmd[len(launcher) :], gpu=plan_gpu)
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode != 0:
        return {"strategy": strategy, "error": f"exit {proc.returncode}"}
    summary = json.loads((run_dir / "summary.json").read_text())
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("perf/tokens_per_s")][1:]  # skip the warm-up window
    tps = sum(float(r["perf/tokens_per_s"]) for r in rows) / max(1, len(rows))
    mfu = [float(r["perf/mfu"]) for r in rows if r.get("perf/mfu")]
    return {
        "strategy": strategy,
        "world": world,
        "tokens_per_s": round(tps),
        "tokens_per_s_per_gpu": round(tps / world),
        "mfu": round(sum(mfu) / len(mfu), 4) if mfu else None,
        "peak_mem_gb": summary.get("peak_mem_gb"),
        "planned_peak_gib": round(predicted_peak_gib(plan), 2),
        "planned_tokens_per_s_per_gpu": round(plan.time.tokens_per_s_per_gpu),
        "val_loss": summary.get("val_loss"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--memory", action="store_true", help="print orchestra-plan's memory table and exit")
    parser.add_argument(
        "--anchors", action="store_true", help="print orchestra-plan against the published runs and exit"
    )
    parser.add_argument("--preset", default="llama-1b", choices=PRESETS)
    parser.add_argument(
        "--strategies",
        nargs="+",
        default=["single", "fsdp", "deepspeed_zero2", "deepspeed_zero3"],
        choices=STRATEGIES,
    )
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--gpus", type=int, default=None, help="GPUs per job (default: all visible)")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument(
        "--seq", type=int, default=None, help="sequence length (default: the preset's context)"
    )
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every job")
    args = parser.parse_args()
    if args.memory:
        print(memory_table(args.gpus or 8, args.micro_batch, args.seq))
        return
    if args.anchors:
        print(anchors_table())
        return

    import torch

    if not torch.cuda.is_available():
        sys.exit("bench/scaling.py measures GPUs; this machine has none (use --memory for the formula table)")
    gpus = args.gpus or torch.cuda.device_count()
    from orchestra.train.sizing import detect_gpu

    plan_gpu = detect_gpu().key
    extra = [
        f"trainer.micro_batch_size={args.micro_batch}",
        f"trainer.global_batch_size={args.micro_batch * gpus}",
        *([f"model.max_seq_len={args.seq}"] if args.seq else []),
        *args.overrides,
    ]
    out = Path(tempfile.mkdtemp(prefix="orchestra-scaling-"))
    results = []
    for st in args.strategies:
        # `single` keeps the global batch of the others through accumulation.
        results.append(run_strategy(args.preset, st, args.steps, gpus, out, extra, plan_gpu))
    device = torch.cuda.get_device_name()
    print(f"\n{args.preset} on {gpus} x {device} — {dt.date.today().isoformat()}\n")
    keys = [
        "strategy",
        "world",
        "tokens_per_s",
        "tokens_per_s_per_gpu",
        "planned_tokens_per_s_per_gpu",
        "mfu",
        "peak_mem_gb",
        "planned_peak_gib",
        "val_loss",
    ]
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in results:
        print("| " + " | ".join(str(r.get(k, r.get("error", "-"))) for k in keys) + " |")
    csv_path = ROOT / "bench" / "results" / "scaling.csv"
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    new = not csv_path.exists()
    with open(csv_path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["date", "device", "gpus", "preset", "steps", *keys, "error"])
        if new:
            writer.writeheader()
        for r in results:
            writer.writerow(
                {
                    "date": dt.date.today().isoformat(),
                    "device": device,
                    "gpus": gpus,
                    "preset": args.preset,
                    "steps": args.steps,
                    **{k: r.get(k) for k in [*keys, "error"]},
                }
            )
    print(f"\nappended to {csv_path}; run dirs under {out}")


if __name__ == "__main__":
    main()
