"""Strategies side by side: tokens/s, MFU and peak memory per rank for one model preset.

GPU run (one node; each strategy is a fresh torchrun job on all local GPUs):

    python bench/scaling.py --preset llama-1b --strategies single fsdp deepspeed_zero2 deepspeed_zero3 --steps 100

Rows are also appended to bench/results/scaling.csv.

Memory table by formula (any machine, no GPU needed) — what docs/scaling.md shows:

    python bench/scaling.py --memory --gpus 8

Model states follow the ZeRO paper for mixed-precision Adam (K = 12 bytes of fp32 master
weights and moments per parameter): DDP 16P, ZeRO-1 4P + 12P/N, ZeRO-2 2P + 14P/N, ZeRO-3 and
FSDP 16P/N. Activations per layer (Korthikanti et al. 2022) with flash attention, bf16:
34 s b h bytes without recompute and 2 s b h with full activation checkpointing.
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


def preset(name: str):  # -> ModelConfig
    from hydra import compose, initialize_config_dir

    from orchestra.cli.common import CONF_DIR
    from orchestra.cli.train import to_config
    from orchestra.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return to_config(compose("config", overrides=[f"model={name}"])).model


def parameter_count(m, vocab: int) -> int:
    kv = m.n_kv_heads * m.head_size
    per_layer = m.dim * (2 * m.dim + 2 * kv) + 3 * m.dim * m.ffn_dim + 2 * m.dim
    embeddings = vocab * m.dim * (1 if m.tie_embeddings else 2)
    return m.n_layers * per_layer + embeddings + m.dim


def model_state_bytes(params: int, strategy: str, n: int) -> float:
    return {
        "ddp": 16 * params,
        "deepspeed_zero1": 4 * params + 12 * params / n,
        "deepspeed_zero2": 2 * params + 14 * params / n,
        "deepspeed_zero3": 16 * params / n,
        "fsdp": 16 * params / n,
    }[strategy]


def memory_table(gpus: int, micro_batch: int, seq: int | None) -> str:
    lines = [
        f"Per-GPU memory in GiB on {gpus} GPUs (bf16 mixed precision, AdamW), micro batch {micro_batch}.",
        "Model states by formula; activations per the Korthikanti estimate (flash attention).",
        "",
        "| preset | params | ddp | zero1 | zero2 | zero3 / fsdp | activations, no recompute | activations, full recompute |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in PRESETS:
        m = preset(name)
        vocab = m.vocab_size or 32000
        params = parameter_count(m, vocab)
        s = seq or m.max_seq_len
        sbh = s * micro_batch * m.dim
        act_full = m.n_layers * 34 * sbh + 4 * s * micro_batch * vocab * 3  # + logits/CE (fp32 logits, grads)
        act_ckpt = m.n_layers * 2 * sbh + 34 * sbh + 4 * s * micro_batch * vocab * 3
        gib = 2**30
        cells = [
            model_state_bytes(params, st, gpus) / gib
            for st in ("ddp", "deepspeed_zero1", "deepspeed_zero2", "fsdp")
        ]
        lines.append(
            f"| {name} | {params / 1e9:.2f} B | "
            + " | ".join(f"{c:.1f}" for c in cells)
            + f" | {act_full / gib:.1f} (s={s}) | {act_ckpt / gib:.1f} |"
        )
    return "\n".join(lines)


def run_strategy(preset_name: str, strategy: str, steps: int, gpus: int, out: Path, extra: list[str]) -> dict:
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
        "val_loss": summary.get("val_loss"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--memory", action="store_true", help="print the formula memory table and exit")
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

    import torch

    if not torch.cuda.is_available():
        sys.exit("bench/scaling.py measures GPUs; this machine has none (use --memory for the formula table)")
    gpus = args.gpus or torch.cuda.device_count()
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
        results.append(run_strategy(args.preset, st, args.steps, gpus, out, extra))
    device = torch.cuda.get_device_name()
    print(f"\n{args.preset} on {gpus} x {device} — {dt.date.today().isoformat()}\n")
    keys = ["strategy", "world", "tokens_per_s", "tokens_per_s_per_gpu", "mfu", "peak_mem_gb", "val_loss"]
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
