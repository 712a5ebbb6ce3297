"""Fine-tuning on one GPU: memory by formula for every method, and measured throughput / peak memory.

Memory tables by formula (any machine, no GPU needed) — what docs/finetune.md shows:

    python bench/finetune.py --memory
    python bench/finetune.py --memory --micro-batch 1 --seq 2048

GPU run (one device; a random-initialised base of the preset's shape is written once as a Hugging
Face folder with the default corpus's tokenizer, then each method is a fresh `orchestra-train
task=sft` job on the bundled SFT examples):

    python bench/finetune.py --preset llama-1b --methods full lora --steps 100
    python bench/finetune.py --preset llama-1b --methods full l2sp lora lora-all adapter prompt unfreeze
    python bench/finetune.py --preset qwen2.5-0.5b --methods lora --steps 50 --kernels torch triton

With several ``--kernels`` each method runs once per backend, side by side on the same base, and
the table adds the final training loss of each, so the fused kernels' speed, memory and loss
difference against torch come from one session.

Trainable parameters are counted exactly: each preset is built on the meta device and the real
methods are applied to it (orchestra.model.peft: apply_lora, apply_adapters, PromptTunedModel).
Model states per GPU, with N parameters of which T train:

- full, bf16-mixed: 16 N (Lightning keeps fp32 weights and gradients, AdamW two fp32 moments);
  + L2-SP: + 4 N (a fp32 copy of the pretrained weights); layer-wise lr decay adds nothing.
- frozen-base methods (lora, adapter, prompt), bf16-mixed: 4 (N - T) + 16 T (frozen fp32 weights,
  no gradients, no optimizer state); bf16-true: 2 (N - T) + 8 T (everything in bf16: trainable
  weights, gradients and both AdamW moments too).

Activations follow bench/scaling.py (Korthikanti et al. 2022, flash attention, bf16): 34 s b h
bytes per layer without recompute, 2 s b h with full activation checkpointing, plus the fp32
logits and their gradient (12 s b V). They are about the same for every method: backward runs
through the frozen layers too.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.benchlib import compose_check  # noqa: E402

# Bytes per NF4 weight (QLoRA's 4-bit codes and their scales), as orchestra-plan counts them.
from orchestra.model.peft.nf4 import NF4_BYTES  # noqa: E402

PRESETS = [
    "debug",
    "llama-125m",
    "llama-350m",
    "llama-1b",
    "llama-3b",
    "llama-8b",
    # The published shapes of the families people fine-tune (conf/model/, docs/models.md).
    "llama-3.2-1b",
    "llama-3.1-8b",
    "qwen2.5-0.5b",
    "qwen2.5-7b",
    "qwen3-0.6b",
    "qwen3-8b",
    "mistral-7b",
    "gemma-2-2b",
    "phi-3-mini",
]
GIB = 2**30
DEFAULT_VOCAB = 32000  # presets without a fixed vocabulary take theirs from the tokenizer

# Methods of the GPU runs: Hydra overrides on top of `task=sft finetune.init_from=<base>`.
METHODS: dict[str, list[str]] = {
    "full": ["finetune=full"],
    "l2sp": ["finetune=l2sp"],
    "layer-lr": ["finetune=full", "finetune.layer_lr_decay=0.8"],
    "lora": ["finetune=lora"],
    "lora-all": [
        "finetune=lora",
        "finetune.lora_rank=16",
        "finetune.lora_alpha=32",
        "finetune.lora_targets=[all-linear]",
    ],
    "dora-all": [
        "finetune=dora",
        "finetune.lora_rank=16",
        "finetune.lora_alpha=32",
        "finetune.lora_targets=[all-linear]",
    ],
    "qlora-all": [
        "finetune=qlora",
        "finetune.lora_rank=16",
        "finetune.lora_alpha=32",
        "finetune.lora_targets=[all-linear]",
    ],
    "adapter": ["finetune=adapter"],
    # A soft prompt is prepended per row, so packing is off (the prompt method refuses it otherwise).
    "prompt": ["finetune=prompt", "task.pack=false"],
    "unfreeze": ["finetune=unfreeze"],
}

# Frozen-base columns of the memory table: (label, method key of count_parameters).
FROZEN_COLUMNS = [
    ("lora r=8 q,v", "lora"),
    ("lora r=16 all-linear", "lora-all"),
    ("dora r=16 all-linear", "dora-all"),
    ("qlora r=16 all-linear", "qlora-all"),
    ("adapter 16", "adapter"),
    ("prompt 20", "prompt"),
]


# --------------------------------------------------------------------------- memory by formula


def presets(names: list[str]) -> dict[str, Any]:  # -> {name: ModelConfig}
    """The model presets as the training CLI composes them (Hydra + the schema), like bench/scaling.py."""
    from hydra import compose, initialize_config_dir

    from orchestra.cli.common import CONF_DIR
    from orchestra.cli.train import to_config
    from orchestra.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return {n: to_config(compose("config", overrides=[f"model={n}"])).model for n in names}


def count_parameters(m: Any, vocab: int) -> dict[str, tuple[int, int]]:
    """(trainable, total) parameters per method for model config ``m``, built on the meta device.

    The real methods are applied, so the counts are what a run trains (a tied embedding counts once).
    """
    import torch

    from orchestra.model import Transformer
    from orchestra.model.peft import LoraConfig, PromptTunedModel, apply_adapters, apply_lora

    def counts(model: torch.nn.Module) -> tuple[int, int]:
        params = list(model.parameters())
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    out: dict[str, tuple[int, int]] = {}
    with torch.device("meta"):
        out["full"] = counts(Transformer(m, vocab))
        model = Transformer(m, vocab)
        apply_lora(model, LoraConfig(rank=8, alpha=16.0, target_modules=["q_proj", "v_proj"]))
        out["lora"] = counts(model)
        model = Transformer(m, vocab)
        apply_lora(model, LoraConfig(rank=16, alpha=32.0, target_modules=["all-linear"]))
        out["lora-all"] = counts(model)
        out["qlora-all"] = out["lora-all"]  # the same LoRA tensors, over an NF4 base
        model = Transformer(m, vocab)
        apply_lora(model, LoraConfig(rank=16, alpha=32.0, target_modules=["all-linear"], use_dora=True))
        out["dora-all"] = counts(model)
        model = Transformer(m, vocab)
        apply_adapters(model, 16)
        out["adapter"] = counts(model)
        out["prompt"] = counts(PromptTunedModel(Transformer(m, vocab), 20))
    return out


def nf4_parameters(m: Any, vocab: int) -> int:
    """Weights finetune=qlora stores in NF4: every decoder linear but the output head."""
    import torch

    from orchestra.model import Transformer

    with torch.device("meta"):
        model = Transformer(m, vocab)
    return sum(
        mod.weight.numel()
        for name, mod in model.named_modules()
        if isinstance(mod, torch.nn.Linear) and name.split(".")[-1] != "lm_head"
    )


def state_bytes(trainable: int, total: int, precision: str, l2sp: bool = False, nf4: int = 0) -> int:
    """Weights + gradients + AdamW state (+ the L2-SP reference) on one GPU; ``nf4`` frozen weights in NF4."""
    frozen = total - trainable - nf4
    quantized = round(NF4_BYTES * nf4)
    if precision == "bf16-mixed":  # fp32 weights; fp32 grads and moments for what trains
        return 4 * frozen + quantized + 16 * trainable + (4 * trainable if l2sp else 0)
    if precision == "bf16-true":  # bf16 everything: weight 2 + grad 2 + two moments 2 + 2
        return 2 * frozen + quantized + 8 * trainable + (2 * trainable if l2sp else 0)
    raise ValueError(f"precision: {precision!r} is not bf16-mixed or bf16-true")


def activation_bytes(m: Any, vocab: int, micro_batch: int, seq: int) -> tuple[int, int, int]:
    """(no recompute, full recompute, of which fp32 logits + their gradient), bench/scaling.py's estimate."""
    sbh = seq * micro_batch * m.dim
    logits = 4 * seq * micro_batch * vocab * 3
    return m.n_layers * 34 * sbh + logits, m.n_layers * 2 * sbh + 34 * sbh + logits, logits


def _gib(n: float) -> str:
    g = n / GIB
    return f"{g:.2f}" if g < 10 else f"{g:.1f}"


def _count(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f} B"
    if n >= 1e6:
        return f"{n / 1e6:.2f} M"
    return f"{n / 1e3:.1f} K"


def memory_table(micro_batch: int = 4, seq: int | None = None, names: list[str] | None = None) -> str:
    """The markdown tables of `--memory`: trainable parameters, then per-GPU memory, per preset and method."""
    configs = presets(names or PRESETS)
    rows = []
    for name, m in configs.items():
        vocab = m.vocab_size or DEFAULT_VOCAB
        s = seq or m.max_seq_len
        rows.append((name, m, count_parameters(m, vocab), activation_bytes(m, vocab, micro_batch, s), s))

    lines = [
        "Trainable parameters per method (exact: the preset built on the meta device, the method applied;",
        f"presets without a fixed vocabulary at V = {DEFAULT_VOCAB}).",
        "",
        "| preset | params | full | lora r=8 q,v | lora r=16 all-linear | adapter 16 | prompt 20 |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, _, c, _, _ in rows:
        total = c["full"][1]
        cells = [
            f"{_count(c[k][0])} ({100 * c[k][0] / c[k][1]:.2g}%)"
            for k in ("lora", "lora-all", "adapter", "prompt")
        ]
        lines.append(f"| {name} | {_count(total)} | {_count(total)} (100%) | " + " | ".join(cells) + " |")

    lines += [
        "",
        f"Per-GPU memory in GiB, fine-tuning on one GPU with AdamW, micro batch {micro_batch}. Model states by formula;",
        "frozen-base columns read `bf16-mixed / bf16-true` (trainer.precision). Activations per the Korthikanti",
        "estimate (flash attention), the same for every method; add them to the model states.",
        "",
        "| preset | full | full + L2-SP | "
        + " | ".join(label for label, _ in FROZEN_COLUMNS)
        + " | activations, no recompute | full recompute | of which logits |",
        "|---|---|---|" + "---|" * len(FROZEN_COLUMNS) + "---|---|---|",
    ]
    for name, m, c, (act, act_ckpt, logits), s in rows:
        trainable, total = c["full"]
        cells = [
            _gib(state_bytes(trainable, total, "bf16-mixed")),
            _gib(state_bytes(trainable, total, "bf16-mixed", l2sp=True)),
        ]
        for _, key in FROZEN_COLUMNS:
            t, n = c[key]
            q = nf4_parameters(m, m.vocab_size or DEFAULT_VOCAB) if key == "qlora-all" else 0
            mixed, true = (state_bytes(t, n, p, nf4=q) for p in ("bf16-mixed", "bf16-true"))
            cells.append(f"{_gib(mixed)} / {_gib(true)}")
        lines.append(
            f"| {name} | "
            + " | ".join(cells)
            + f" | {_gib(act)} (s={s}) | {_gib(act_ckpt)} | {_gib(logits)} |"
        )
    lines += [
        "",
        "full: 16 B/param (fp32 weights and gradients, two fp32 AdamW moments); L2-SP adds a fp32 copy of the",
        "pretrained weights (4 B/param); finetune.layer_lr_decay adds nothing. Frozen base: 4 B/param under",
        "bf16-mixed, 2 under bf16-true, plus 16 B (bf16-mixed) or 8 B (bf16-true) per trainable parameter:",
        "bf16-true also keeps the trainable weights, their gradients and the AdamW moments in bf16.",
        f"qlora: the decoder's linear weights in NF4 at {NF4_BYTES:.3f} B/param (4-bit codes, an 8-bit absmax per 64,",
        "an fp32 scale per 256 absmax values); embeddings, norms and the output head as for a frozen base.",
        "dora: LoRA's tensors plus one magnitude per output row; each targeted layer also builds its dense",
        "[out, in] update for the row norms in its forward (transient, one layer at a time).",
        "`logits` (fp32 logits and their gradient, 12 s b V) is not allocated with model.kernels=triton",
        "(the fused linear cross-entropy; `auto` picks it on CUDA).",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- GPU runs


def finetune_overrides(
    method: str,
    base: Path | str,
    steps: int,
    micro_batch: int,
    precision: str,
    run_dir: Path | str,
    kernels: str = "auto",
) -> list[str]:
    """The `orchestra-train` overrides of one method's run."""
    return [
        "task=sft",
        *METHODS[method],
        f"model.kernels={kernels}",
        f"finetune.init_from={base}",
        f"trainer.precision={precision}",
        f"trainer.max_steps={steps}",
        f"trainer.micro_batch_size={micro_batch}",
        f"trainer.global_batch_size={micro_batch}",
        f"trainer.val_every_n_steps={steps}",
        "trainer.val_batches=2",
        f"trainer.ckpt_every_n_steps={steps}",
        f"trainer.log_every_n_steps={max(1, min(10, steps // 5))}",
        f"scheduler.warmup_steps={min(10, steps - 1)}",
        "trainer.progress_bar=false",
        "trainer.sample_tokens=8",
        "energy=none",
        f"name=bench-finetune-{method}",
        f"hydra.run.dir={run_dir}",
    ]


def build_base(preset_name: str, seq: int | None, out: Path) -> Path:
    """A random-initialised Hugging Face folder of the preset's shape with the default corpus's tokenizer.

    Throughput and memory do not depend on the weights' values, so this stands in for a real
    pretrained model (the losses of the runs mean nothing). The context is ``seq`` (default: the
    preset's), which fixes the length of every SFT row.
    """
    from dataclasses import replace

    import torch
    from safetensors.torch import save_file

    from orchestra.config import DataConfig, padded_vocab_size
    from orchestra.data.pack import prepare_dataset
    from orchestra.model import build_model
    from orchestra.model.hf import hf_config_dict, to_hf_state_dict

    m = presets([preset_name])[preset_name]
    if seq:
        m = replace(m, max_seq_len=seq)
    dataset_dir = Path(prepare_dataset(DataConfig(), seed=1234))  # the default corpus and its tokenizer
    manifest = json.loads((dataset_dir / "manifest.json").read_text())
    vocab = padded_vocab_size(m, int(manifest["vocab_size"]))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = build_model(m, vocab, device=device).to(torch.bfloat16)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    folder = out / f"base-{preset_name}"
    folder.mkdir(parents=True, exist_ok=True)
    hf_state = {k: v.clone() for k, v in to_hf_state_dict(state, m).items()}
    save_file(hf_state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    eos = int(manifest["eos_id"])
    config = hf_config_dict(m, vocab, bos_id=eos, eos_id=eos, torch_dtype="bfloat16")
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    shutil.copy(dataset_dir / "tokenizer.json", folder / "tokenizer.json")
    return folder


def read_run(run_dir: Path) -> dict[str, Any]:
    """summary.json + the mean tokens/s of metrics.csv's logged windows after the first (warm-up)."""
    summary = json.loads((run_dir / "summary.json").read_text())
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("perf/tokens_per_s")]
    steady = rows[1:] or rows
    tps = sum(float(r["perf/tokens_per_s"]) for r in steady) / len(steady) if steady else None
    peak = summary.get("peak_mem_gb")
    return {
        "trainable_params": summary["trainable_parameters"],
        "trainable_pct": round(100 * summary["trainable_parameters"] / summary["parameters"], 3),
        "params_m": round(summary["parameters"] / 1e6, 1),
        "steps": summary["steps"],
        "precision": summary.get("precision"),
        "tokens_per_s": None if tps is None else round(tps),
        "peak_mem_gb": None if peak is None else round(peak, 2),
        "train_loss": None if summary.get("train_loss") is None else round(float(summary["train_loss"]), 4),
    }


def run_method(
    method: str,
    base: Path,
    steps: int,
    micro_batch: int,
    precision: str,
    out: Path,
    keep_checkpoints: bool,
    kernels: str = "auto",
) -> dict[str, Any]:
    run_dir = out / f"{method}-{kernels}"
    overrides = finetune_overrides(method, base, steps, micro_batch, precision, run_dir, kernels)
    cmd = [sys.executable, "-m", "orchestra.cli.train", *overrides]
    print("$ orchestra-train " + " ".join(overrides), flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode != 0:
        return {"method": method, "kernels": kernels, "error": f"exit {proc.returncode}"}
    result = {"method": method, "kernels": kernels, **read_run(run_dir)}
    if not keep_checkpoints:  # a full fine-tune's checkpoint holds weights + AdamW state: 12+ B/param
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return result


KEYS = [
    "method",
    "kernels",
    "precision",
    "params_m",
    "trainable_params",
    "trainable_pct",
    "steps",
    "tokens_per_s",
    "peak_mem_gb",
    "train_loss",
]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--memory", action="store_true", help="print the formula memory tables and exit")
    parser.add_argument("--preset", default="llama-1b", choices=PRESETS)
    parser.add_argument(
        "--methods", nargs="+", default=["full", "lora", "adapter", "prompt"], choices=sorted(METHODS)
    )
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--micro-batch", type=int, default=4, help="rows per step (no accumulation)")
    parser.add_argument(
        "--seq", type=int, default=None, help="context / SFT row length (default: the preset's)"
    )
    parser.add_argument("--precision", default="bf16-mixed", choices=["bf16-mixed", "bf16-true"])
    parser.add_argument(
        "--kernels",
        nargs="+",
        default=["auto"],
        choices=["auto", "torch", "triton"],
        help="model.kernels per run",
    )
    parser.add_argument(
        "--base", type=Path, default=None, help="an existing base (HF folder or checkpoint) to use"
    )
    parser.add_argument("--out", type=Path, default=None, help="base and run dirs (default: a temp dir)")
    parser.add_argument("--keep-checkpoints", action="store_true", help="keep each run's checkpoints/")
    args = parser.parse_args()
    if args.memory:
        print(memory_table(args.micro_batch, args.seq))
        return
    if args.steps < 2:
        parser.error("--steps must be at least 2")

    import torch

    if not torch.cuda.is_available():
        sys.exit(
            "bench/finetune.py measures a GPU; this machine has none "
            "(python bench/finetune.py --memory prints the formula tables)"
        )
    out = args.out or Path(tempfile.mkdtemp(prefix="orchestra-finetune-"))
    placeholder = args.base or out / "base"
    runs = [(m, k) for m in args.methods for k in args.kernels]
    for method, kernels in runs:  # every command must compose and validate before anything is built
        compose_check(
            [
                o
                for o in finetune_overrides(
                    method, placeholder, args.steps, args.micro_batch, args.precision, out / method, kernels
                )
                if not o.startswith("hydra.")
            ]
        )
    base = args.base or build_base(args.preset, args.seq, out)
    device, date = torch.cuda.get_device_name(), dt.date.today().isoformat()
    csv_path = ROOT / "bench" / "results" / "finetune.csv"
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    preset = str(args.base) if args.base else args.preset
    results = []
    for m, k in runs:  # each row is appended as its run ends, so a time box keeps what finished
        results.append(
            run_method(m, base, args.steps, args.micro_batch, args.precision, out, args.keep_checkpoints, k)
        )
        print(f"[{m} {k}] {json.dumps(results[-1])}", flush=True)
        new = not csv_path.exists()
        with open(csv_path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["date", "device", "preset", "micro_batch", *KEYS, "error"])
            if new:
                writer.writeheader()
            writer.writerow(
                {
                    "date": date,
                    "device": device,
                    "preset": preset,
                    "micro_batch": args.micro_batch,
                    **{k: results[-1].get(k) for k in [*KEYS, "error"]},
                }
            )

    what = f"base {base}" if args.base else f"{args.preset} (random-initialised base)"
    print(
        f"\n{what}, task=sft, micro batch {args.micro_batch}, {args.steps} steps on 1 x {device} — {date} — "
        f"torch {torch.__version__}\n"
    )
    print("| " + " | ".join(KEYS) + " |\n|" + "---|" * len(KEYS))
    for r in results:
        print("| " + " | ".join(str(r.get(k, r.get("error", "-"))) for k in KEYS) + " |")
    print(f"\nappended to {csv_path}; run dirs under {out}")


if __name__ == "__main__":
    main()
