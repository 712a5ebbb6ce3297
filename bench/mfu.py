"""Training MFU of three loops on one Llama shape: orchestra-train, Hugging Face + Liger-Kernel, bare PyTorch.

    python bench/mfu.py                                   # llama-1b, seq 2048, micro-batch 4, bf16
    python bench/mfu.py --steps 10 --warmup 3 --loops orchestra torch
    python bench/mfu.py --override strategy.cuda_graphs=true --override model.sdpa_backend=cudnn
    python bench/mfu.py --no-levers                       # the speed levers at their config defaults
    python bench/mfu.py --preset tiny --device cpu --seq 64 --micro-batch 2 --steps 3 --warmup 1

The three rows train the same shape (``--preset``, ``model.max_seq_len = --seq``) at the same
micro-batch, in the same dtype (bf16: fp32 weights under bf16 autocast, i.e. Lightning's
bf16-mixed; fp32: full fp32), for ``--warmup`` untimed steps and then ``--steps`` timed ones:

- ``orchestra``: the real entrypoint, ``python -m orchestra.cli.train``, with the speed levers of
  LEVERS on (on CUDA; ``--no-levers`` leaves them at the config's defaults) and every
  ``--override KEY=VALUE``. It reads its own corpus (the config's data, the default corpus unless
  overridden) and initialises its own weights from ``seed``, so its first loss is not comparable to
  the other two; tokens/s comes from the run's metrics.csv windows after the warm-up ones, peak
  memory from its summary.json.
- ``hf-liger``: ``transformers.LlamaForCausalLM`` (SDPA attention) from the same shape, with
  Liger-Kernel's RoPE, RMSNorm, SwiGLU and fused linear cross-entropy where CUDA and the package
  are there, loaded with the ``torch`` row's initial weights through Orchestra's own HF mapping
  (orchestra.model.hf.to_hf_state_dict, the one orchestra-export writes), trained by a plain loop:
  forward with labels, backward, gradient clipping, AdamW (fused on CUDA).
- ``torch``: Orchestra's model (orchestra.model.build_model) in a plain loop, no Lightning:
  forward(tokens, targets) -> loss, backward, clipping, Orchestra's AdamW; the strategy's
  per-block torch.compile when strategy.compile is on (the levers), as in the orchestra row.

The ``hf-liger`` and ``torch`` rows see the same token ids (a seeded generator) and the same
initial weights (both build the Orchestra model from ``seed``; each reports a fingerprint of the
weights it starts from, the HF one read back through the mapping), so their first-step losses
must agree: within bf16 rounding on GPU, tightly in fp32. That check is printed (and fails the
run): it shows the two rows compute the same thing. HF's loss ignores the last position of each
row (it shifts the labels), so the ``torch`` row's targets ignore it too.

MFU is the same formula for every row: tokens/s x orchestra.train.flops.model_flops_per_token over
the device's peak for the dtype (flops.device_peak_flops); no peak is known off CUDA, so CPU rows
show "-". Each row runs in its own process, so its peak memory (torch.cuda.max_memory_allocated)
is its own. The table (device, versions, date above it) is printed at the end, and each row is
appended to bench/results/mfu.csv as it finishes.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import importlib.metadata
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# `python bench/mfu.py` puts bench/ first on sys.path, where bench/kernels.py would shadow PyPI's
# `kernels` package, which transformers imports: the repository root replaces it.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

from bench.benchlib import append_csv, compose_check, read_losses  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "mfu.csv"
LOOPS = ("orchestra", "hf-liger", "torch")
PRESETS: dict[str, list[str]] = {
    # name: orchestra-train overrides of the model; every row takes its shape from them.
    "llama-1b": ["model=llama-1b"],  # Llama-3.2-1B's shape: dim 2048, 16 layers, 32/8 heads, tied
    # The debug model's shape (dim 256, 4 layers, 4/2 heads), with a vocabulary of its own so
    # the rows need no tokenizer: 4096 holds the default corpus's tokenizer (and smaller ones).
    "tiny": ["model=debug", "model.vocab_size=4096"],
}
# The speed levers the orchestra row (and, through the same config, the torch row) turns on by
# default on CUDA; --no-levers drops them. Edit here as levers are added.
LEVERS: list[str] = [
    "strategy.compile=true",
    "model.attention=auto",
    "optim.fused=true",
]
PRECISION = {"bf16": "bf16-mixed", "fp32": "32-true"}  # --dtype -> trainer.precision (every row)
# |first-step loss hf-liger - torch| allowed: bf16 rounding (different kernels, bf16 matmuls)
# against fp32, where only the order of the reductions differs.
LOSS_TOLERANCE = {"bf16": 5e-2, "fp32": 1e-4}
LIGER_KERNELS = {
    "rope": True,
    "rms_norm": True,
    "swiglu": True,
    "cross_entropy": False,
    "fused_linear_cross_entropy": True,
}
HEADER = [
    "loop",
    "params (M)",
    "seq",
    "micro-batch",
    "steps timed",
    "tokens/s",
    "MFU (%)",
    "peak mem (GiB)",
    "first-step loss",
    "notes",
]
CSV_FIELDS = [
    "date", "device", "torch", "transformers", "liger", "preset", "dtype", "levers", "loop", "params_m",
    "seq", "micro_batch", "steps_timed", "tokens_per_s", "mfu", "peak_mem_gb", "first_loss", "loss_step",
    "weights_fingerprint", "notes", "error",
]  # fmt: skip


# ----------------------------------------------------------------------------- the commands


def orchestra_overrides(
    preset: str,
    seq: int,
    micro_batch: int,
    steps: int,
    warmup: int,
    dtype: str,
    device: str,
    run_dir: Path | str,
    levers: Sequence[str] = (),
    extra: Sequence[str] = (),
) -> list[str]:
    """The orchestra-train overrides of the orchestra row; the other rows read their config from them too.

    Metrics are logged every gcd(warmup, steps) steps, so whole windows cover the warm-up and the
    timed steps (a window's timing syncs the device); validation, the checkpoint and the sample
    happen once, after the last window, and are kept small.
    """
    total = warmup + steps
    return [
        *PRESETS[preset],
        f"model.max_seq_len={seq}",
        f"trainer.micro_batch_size={micro_batch}",
        f"trainer.global_batch_size={micro_batch}",
        f"trainer.max_steps={total}",
        f"trainer.log_every_n_steps={math.gcd(warmup, steps)}",
        f"trainer.val_every_n_steps={total}",
        "trainer.val_batches=1",
        f"trainer.ckpt_every_n_steps={total}",
        "trainer.progress_bar=false",
        "trainer.sample_tokens=4",
        f"trainer.precision={PRECISION[dtype]}",
        f"trainer.accelerator={'gpu' if device == 'cuda' else 'cpu'}",
        f"scheduler.warmup_steps={warmup}",
        "energy=none",
        "resume=never",
        "name=bench-mfu",
        f"hydra.run.dir={run_dir}",
        *levers,
        *extra,
    ]


def token_batch(vocab: int, micro_batch: int, seq: int, seed: int) -> Any:
    """[micro_batch, seq] token ids from a seeded CPU generator: the same tensor in every process."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (micro_batch, seq), generator=gen)


def shifted_targets(tokens: Any) -> Any:
    """Next-token targets of ``tokens`` with the last position ignored, as HF's shifted labels have it."""
    import torch.nn.functional as F

    from orchestra.model.config import IGNORE_INDEX

    return F.pad(tokens[:, 1:], (0, 1), value=IGNORE_INDEX)


def weights_fingerprint(state: dict[str, Any]) -> float:
    """Sum of squares of every tensor (a tied matrix once, by storage): equal weights, equal number."""
    seen: set[int] = set()
    total = 0.0
    for name in sorted(state):
        tensor = state[name]
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        total += float(tensor.detach().double().pow(2).sum())
    return total


# --------------------------------------------------------------------------- the worker rows


def timed_loop(step: Callable[[], Any], warmup: int, steps: int, device: Any) -> tuple[float, float]:
    """(first step's loss, seconds of the ``steps`` timed steps after ``warmup`` untimed ones)."""
    import torch

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    first = math.nan
    start = 0.0
    for i in range(warmup + steps):
        if i == warmup:
            sync()
            start = time.perf_counter()
        loss = step()
        if i == 0:
            first = float(loss)  # a sync, inside the warm-up
    sync()
    return first, time.perf_counter() - start


def plain_loop(
    model: Any, loss_of: Callable[[], Any], optimizer: Any, clip: float, spec: dict[str, Any], device: Any
) -> tuple[float, float]:
    """(first loss, timed seconds) of forward, backward, clipping and the optimizer step, as a
    training step takes them, in the precision of ``spec``; memory peaks counted from here."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> Any:
        with _autocast(spec, device):
            loss = loss_of()
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    _memory_reset(device)
    return timed_loop(step, spec["warmup"], spec["steps"], device)


def _worker_setup(spec: dict[str, Any]) -> tuple[Any, Any, int, Any]:
    """(TrainConfig, torch device, vocab, Orchestra model built from the seed) of a worker row."""
    import torch

    from orchestra.model import build_model

    cfg = compose_check(spec["overrides"])
    if cfg.model.vocab_size is None:
        raise SystemExit("bench/mfu.py needs an explicit model.vocab_size (the presets set one)")
    device = torch.device(spec["device"])
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, cfg.model.vocab_size, device=device).train()
    return cfg, device, cfg.model.vocab_size, model


def _autocast(spec: dict[str, Any], device: Any) -> Any:
    import contextlib

    import torch

    if spec["dtype"] == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _memory_reset(device: Any) -> None:
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: Any) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def torch_row(spec: dict[str, Any]) -> dict[str, Any]:
    """Orchestra's model in a plain loop: forward(tokens, targets), backward, clip, AdamW step."""

    from orchestra.train.optim import build_optimizer
    from orchestra.train.strategy import parallelize

    cfg, device, vocab, model = _worker_setup(spec)
    fingerprint = weights_fingerprint(model.state_dict())
    parallelize(model, cfg.strategy, PRECISION[spec["dtype"]])  # strategy.compile: per-block compile
    optimizer = build_optimizer(model, cfg.optim)
    tokens = token_batch(vocab, spec["micro_batch"], spec["seq"], cfg.seed).to(device)
    targets = shifted_targets(tokens)
    first, seconds = plain_loop(
        model, lambda: model(tokens, targets), optimizer, cfg.trainer.grad_clip, spec, device
    )
    return {
        "params": model.num_parameters(),
        "first_loss": first,
        "seconds": seconds,
        "peak_mem_gb": _peak_gib(device),
        "weights_fingerprint": fingerprint,
        "notes": f"compile: {'on' if cfg.strategy.compile else 'off'}",
    }


def apply_liger(device: Any, wanted: bool) -> str:
    """Patch transformers' Llama with Liger's kernels (before the model is built); says what was done."""
    if not wanted:
        return "off (--no-liger)"
    if device.type != "cuda":
        return "off (no CUDA)"
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_llama
    except ImportError:
        return "off (not installed)"
    apply_liger_kernel_to_llama(**LIGER_KERNELS)
    return "on (" + ", ".join(k for k, v in LIGER_KERNELS.items() if v) + ")"


def hf_row(spec: dict[str, Any]) -> dict[str, Any]:
    """transformers' LlamaForCausalLM (+ Liger) with the torch row's weights, in a plain loop."""
    import torch
    import transformers

    from orchestra.model.hf import from_hf_state_dict, hf_config_dict, to_hf_state_dict

    cfg, device, vocab, ours = _worker_setup(spec)
    if cfg.model.family != "llama":
        raise SystemExit(f"the hf-liger row builds LlamaForCausalLM; model.family is {cfg.model.family}")
    liger = apply_liger(device, spec["liger"])
    config = transformers.LlamaConfig(**{**hf_config_dict(cfg.model, vocab), "attn_implementation": "sdpa"})
    with torch.device(device):
        hf = transformers.LlamaForCausalLM(config)
    attention = hf.config._attn_implementation
    if attention != "sdpa":
        raise RuntimeError(f"HF model runs {attention} attention, not sdpa")
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(ours.state_dict(), cfg.model), strict=False)
    if unexpected or missing != (["lm_head.weight"] if cfg.model.tie_embeddings else []):
        raise RuntimeError(f"HF load: missing {missing}, unexpected {unexpected}")
    if cfg.model.tie_embeddings and hf.lm_head.weight.data_ptr() != hf.model.embed_tokens.weight.data_ptr():
        raise RuntimeError("HF model did not tie lm_head to the embeddings")
    del ours
    hf.train()
    fingerprint = weights_fingerprint(from_hf_state_dict(hf.state_dict(), cfg.model))
    on_cuda = device.type == "cuda"
    o = cfg.optim
    optimizer = torch.optim.AdamW(
        hf.parameters(), lr=o.lr, betas=(o.betas[0], o.betas[1]), eps=o.eps, weight_decay=o.weight_decay,
        fused=on_cuda, foreach=not on_cuda,
    )  # fmt: skip
    tokens = token_batch(vocab, spec["micro_batch"], spec["seq"], cfg.seed).to(device)
    first, seconds = plain_loop(
        hf,
        lambda: hf(input_ids=tokens, labels=tokens, use_cache=False).loss,
        optimizer,
        cfg.trainer.grad_clip,
        spec,
        device,
    )
    return {
        "params": sum(p.numel() for p in hf.parameters()),
        "first_loss": first,
        "seconds": seconds,
        "peak_mem_gb": _peak_gib(device),
        "weights_fingerprint": fingerprint,
        "liger": liger,
        "notes": f"liger: {liger}; sdpa",
    }


def run_worker(loop: str, spec: dict[str, Any], log: Path) -> dict[str, Any]:
    """Run one worker row in a fresh process (its own CUDA context and peak memory)."""
    result = log.with_suffix(".json")
    result.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", loop, "--worker-spec", json.dumps(spec),
           "--worker-result", str(result)]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with open(log, "wb") as f:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0 or not result.is_file():
        return {"error": f"exit {proc.returncode}; see {log}", "log_tail": _tail(log)}
    out: dict[str, Any] = json.loads(result.read_text())
    return out


def run_hf(spec: dict[str, Any], out: Path) -> dict[str, Any]:
    """The hf-liger row; where it fails with Liger's kernels on, once more without them (noted).

    A Liger release that does not match the installed transformers fails inside the patched
    forward; the plain transformers row is still a reference worth having from a time-boxed run.
    """
    raw = run_worker("hf-liger", spec, out / "hf-liger.log")
    if not raw.get("error") or not spec["liger"]:
        return raw
    print(f"hf-liger failed with Liger's kernels ({raw['error']}); once more without them:", flush=True)
    print("  | " + raw.pop("log_tail", "").replace("\n", "\n  | "), flush=True)
    plain = run_worker("hf-liger", {**spec, "liger": False}, out / "hf-plain.log")
    if not plain.get("error"):
        plain["liger"] = f"off (failed: see {out / 'hf-liger.log'})"
        plain["notes"] = f"liger: {plain['liger']}; sdpa"
    return plain


def _tail(log: Path, lines: int = 25) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# ------------------------------------------------------------------------------ the orchestra row


def read_orchestra_run(run_dir: Path, warmup: int, steps: int, tokens_per_step: int) -> dict[str, Any]:
    """Timed tokens/s of an orchestra-train run from its metrics.csv windows after the warm-up ones.

    Every window holds gcd(warmup, steps) steps (orchestra_overrides), so the first
    warmup / window rows are the warm-up; the others' seconds are summed, tokens/s is their tokens
    over their seconds (not a mean of the windows' rates).
    """
    window = math.gcd(warmup, steps)
    summary = json.loads((run_dir / "summary.json").read_text())
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = sorted(
            (r for r in csv.DictReader(f) if r.get("perf/tokens_per_s")), key=lambda r: float(r["step"])
        )
    timed = rows[warmup // window :]
    if not timed:
        raise RuntimeError(f"{run_dir}: no throughput window after the {warmup} warm-up steps")
    seconds = sum(window * tokens_per_step / float(r["perf/tokens_per_s"]) for r in timed)
    losses = read_losses(run_dir)
    first_step = min(losses) if losses else None
    return {
        "params": summary["parameters"],
        "steps_timed": len(timed) * window,
        "seconds": seconds,
        "peak_mem_gb": summary.get("peak_mem_gb"),
        "first_loss": losses[first_step] if first_step is not None else None,
        "loss_step": None if first_step is None else first_step + 1,
        "summary_steps": summary["steps"],
    }


def run_orchestra(overrides: list[str], run_dir: Path, warmup: int, steps: int, tokens_per_step: int,
                  keep_checkpoints: bool) -> dict[str, Any]:  # fmt: skip
    """orchestra-train as a user runs it, its console in run_dir/console.log (a fresh run dir each time)."""
    shutil.rmtree(run_dir, ignore_errors=True)  # an earlier run's metrics.csv must not be read as this one's
    run_dir.mkdir(parents=True)
    log = run_dir / "console.log"
    print("$ orchestra-train " + " ".join(overrides), flush=True)
    with open(log, "wb") as f:
        proc = subprocess.run(
            [sys.executable, "-m", "orchestra.cli.train", *overrides],
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            stdout=f,
            stderr=subprocess.STDOUT,
        )
    if not keep_checkpoints:  # a 1B run's last.ckpt holds weights + AdamW state, ~15 GB
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}; see {log}", "log_tail": _tail(log)}
    try:
        result = read_orchestra_run(run_dir, warmup, steps, tokens_per_step)
    except (OSError, KeyError, ValueError, RuntimeError) as err:
        return {"error": f"{type(err).__name__}: {err}"}
    return {**result, "notes": "own init (seed) and corpus"}


# ------------------------------------------------------------------------------------ the table


def finish_row(loop: str, raw: dict[str, Any], seq: int, micro_batch: int, steps: int,
               flops_per_token: float, peak: float | None) -> dict[str, Any]:  # fmt: skip
    """A table/CSV row from a loop's raw result: tokens/s and MFU by the one formula."""
    row: dict[str, Any] = {"loop": loop, "seq": seq, "micro_batch": micro_batch}
    if raw.get("error"):
        return {**row, "error": raw["error"], "notes": raw.get("notes")}
    timed = int(raw.get("steps_timed", steps))
    tps = timed * micro_batch * seq / raw["seconds"] if raw["seconds"] > 0 else None
    return {
        **row,
        "params_m": round(raw["params"] / 1e6, 2),
        "steps_timed": timed,
        "tokens_per_s": None if tps is None else round(tps, 1),
        "mfu": None if tps is None or not peak else round(tps * flops_per_token / peak, 4),
        "peak_mem_gb": None if raw.get("peak_mem_gb") is None else round(raw["peak_mem_gb"], 2),
        "first_loss": None if raw.get("first_loss") is None else round(raw["first_loss"], 6),
        "loss_step": raw.get("loss_step", 1),
        "weights_fingerprint": raw.get("weights_fingerprint"),
        "notes": raw.get("notes"),
    }


def _cell(row: dict[str, Any], column: str) -> str:
    key = {
        "params (M)": "params_m", "micro-batch": "micro_batch", "steps timed": "steps_timed",
        "tokens/s": "tokens_per_s", "MFU (%)": "mfu", "peak mem (GiB)": "peak_mem_gb",
        "first-step loss": "first_loss",
    }.get(column, column)  # fmt: skip
    if column == "notes" and row.get("error"):
        return f"ERROR: {row['error']}"
    value = row.get(key)
    if value is None:
        return "-"
    if column == "MFU (%)":
        return f"{100 * value:.1f}"
    if column == "tokens/s":
        return f"{value:,.0f}"
    if column == "first-step loss":
        step = row.get("loss_step")
        return f"{value:.4f}" + (f" (step {step})" if step not in (None, 1) else "")
    return str(value)


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(_cell(r, c) for c in HEADER) + " |" for r in rows]
    return "\n".join(lines)


def loss_check(rows: Sequence[dict[str, Any]], dtype: str) -> tuple[bool, list[str]]:
    """(passed, lines): the hf-liger and torch rows start from the same weights and the same loss."""
    by = {r["loop"]: r for r in rows if not r.get("error")}
    hf, ours = by.get("hf-liger"), by.get("torch")
    if hf is None or ours is None:
        return True, ["first-step loss check: needs both the hf-liger and torch rows (skipped)"]
    ok = True
    lines = []
    fa, fb = hf.get("weights_fingerprint"), ours.get("weights_fingerprint")
    if fa is not None and fb is not None:
        same = math.isclose(fa, fb, rel_tol=1e-9)
        ok &= same
        lines.append(
            f"initial weights: hf-liger {fa:.9g} vs torch {fb:.9g} (sum of squares): "
            + ("same" if same else "DIFFERENT")
        )
    tol = LOSS_TOLERANCE[dtype]
    diff = abs(hf["first_loss"] - ours["first_loss"])
    agree = diff <= tol
    ok &= agree
    lines.append(
        f"first-step loss check ({dtype}): hf-liger {hf['first_loss']:.6f} vs torch {ours['first_loss']:.6f}: "
        f"|diff| = {diff:.3g} (tolerance {tol:g}): " + ("OK" if agree else "MISMATCH")
    )
    return ok, lines


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


# --------------------------------------------------------------------------------------- the CLI


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="llama-1b", choices=sorted(PRESETS))
    parser.add_argument("--seq", type=int, default=2048, help="tokens per row (model.max_seq_len)")
    parser.add_argument("--micro-batch", type=int, default=4, help="rows per step (no accumulation)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per row")
    parser.add_argument(
        "--warmup", type=int, default=5, help="untimed steps before them (compiles, autotune)"
    )
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    parser.add_argument(
        "--dtype", choices=["auto", *PRECISION], default="auto", help="auto: bf16 on CUDA, else fp32"
    )
    parser.add_argument("--loops", nargs="+", choices=LOOPS, default=list(LOOPS))
    levers = parser.add_mutually_exclusive_group()
    levers.add_argument("--no-levers", action="store_true", help="leave LEVERS at the config's defaults")
    levers.add_argument(
        "--levers", action="store_true", help="turn LEVERS on off CUDA too (default: CUDA only)"
    )
    parser.add_argument("--no-liger", action="store_true", help="the hf-liger row without Liger's kernels")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="a Hydra override of the orchestra row, read by the torch and hf-liger rows too (repeatable)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, help="run dirs and logs (default: a temp dir)")
    parser.add_argument("--csv", type=Path, default=RESULTS)
    parser.add_argument(
        "--keep-checkpoints", action="store_true", help="keep the orchestra run's checkpoints/"
    )
    parser.add_argument("--worker", choices=["hf-liger", "torch"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-spec", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-result", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for o in args.override:
        if "=" not in o:
            parser.error(f"--override {o!r}: expected KEY=VALUE")
    if min(args.seq, args.micro_batch, args.steps, args.warmup) < 1:
        parser.error("--seq, --micro-batch, --steps and --warmup must be positive (warm-up steps >= 1)")
    args.loops = list(dict.fromkeys(args.loops))
    return args


def resolve(args: argparse.Namespace) -> tuple[str, str, list[str]]:
    """(device, dtype, levers) that --device auto / --dtype auto / the lever flags stand for."""
    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    dtype = args.dtype if args.dtype != "auto" else ("bf16" if device == "cuda" else "fp32")
    on = not args.no_levers and (device == "cuda" or args.levers)
    return device, dtype, list(LEVERS) if on else []


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        spec = json.loads(args.worker_spec)
        result = (hf_row if args.worker == "hf-liger" else torch_row)(spec)
        args.worker_result.write_text(json.dumps(result))
        return 0

    device, dtype, levers = resolve(args)
    out = args.out or Path(tempfile.mkdtemp(prefix="orchestra-mfu-"))
    out.mkdir(parents=True, exist_ok=True)
    run_dir = out / "orchestra"
    overrides = orchestra_overrides(args.preset, args.seq, args.micro_batch, args.steps, args.warmup, dtype,
                                    device, run_dir, levers, args.override)  # fmt: skip
    cfg = compose_check(overrides)  # a bad command fails here, before anything trains
    if cfg.model.vocab_size is None:
        raise SystemExit("bench/mfu.py needs an explicit model.vocab_size (the presets set one)")
    if cfg.trainer.precision != PRECISION[dtype]:  # every row trains in --dtype: set it there
        raise SystemExit(
            f"trainer.precision={cfg.trainer.precision}: use --dtype (bf16: bf16-mixed, fp32: 32-true)"
        )

    import torch

    from orchestra.train.flops import device_peak_flops, model_flops_per_token, precision_dtype

    seq = cfg.model.max_seq_len
    flops_per_token = model_flops_per_token(cfg.model, cfg.model.vocab_size, seq)
    if device == "cuda":
        name = torch.cuda.get_device_name()
        units = torch.cuda.get_device_properties(0).multi_processor_count
        peak = cfg.trainer.peak_flops or device_peak_flops(name, precision_dtype(PRECISION[dtype]), units)
    else:
        name, peak = "cpu", cfg.trainer.peak_flops
    date = dt.date.today().isoformat()
    versions = {"torch": torch.__version__, "transformers": _version("transformers"),
                "liger": _version("liger-kernel")}  # fmt: skip
    spec = {"overrides": overrides, "device": device, "dtype": dtype, "seq": seq,
            "micro_batch": args.micro_batch, "warmup": args.warmup, "steps": args.steps,
            "liger": not args.no_liger}  # fmt: skip
    base = {"date": date, "device": name, **versions, "preset": args.preset, "dtype": dtype,
            "levers": " ".join(levers) or "none"}  # fmt: skip
    print(f"{args.preset}: seq {seq}, micro-batch {args.micro_batch}, {dtype}, {args.warmup} warm-up + "
          f"{args.steps} timed steps per row on {name}; levers: {base['levers']}", flush=True)  # fmt: skip

    rows: list[dict[str, Any]] = []
    liger = "-"
    for loop in args.loops:
        t0 = time.perf_counter()
        if loop == "orchestra":
            raw = run_orchestra(overrides, run_dir, args.warmup, args.steps, args.micro_batch * seq,
                                args.keep_checkpoints)  # fmt: skip
        else:
            raw = run_hf(spec, out) if loop == "hf-liger" else run_worker(loop, spec, out / f"{loop}.log")
            liger = raw.get("liger", liger) if loop == "hf-liger" else liger
        row = finish_row(loop, raw, seq, args.micro_batch, args.steps, flops_per_token, peak)
        rows.append(row)
        append_csv(args.csv, CSV_FIELDS, [{**base, **row}])
        status = row.get("error") or ", ".join(f"{c} {_cell(row, c)}" for c in HEADER[4:])
        print(f"[{time.perf_counter() - t0:6.1f} s] {loop}: {status}", flush=True)
        if raw.get("log_tail"):
            print("  | " + raw["log_tail"].replace("\n", "\n  | "), flush=True)

    ok, check = loss_check(rows, dtype)
    print(f"\nDevice: {name} — {date} — torch {versions['torch']}, transformers {versions['transformers']}, "
          f"liger-kernel {versions['liger']} (hf-liger row: liger {liger})")  # fmt: skip
    print(f"{args.preset}, {dtype} ({PRECISION[dtype]}), {flops_per_token / 1e9:.3g} "
          f"GFLOP/token, peak {'-' if not peak else f'{peak / 1e12:.0f} TFLOP/s'}; levers: {base['levers']}\n")  # fmt: skip
    print(markdown(rows))
    print()
    for line in check:
        print(line)
    if "orchestra" in args.loops:
        print(
            "orchestra row: its own initialisation (from seed) and its own corpus, not the shared weights and batch"
        )
    print(f"\nappended to {args.csv}; logs and run dir under {out}")
    return 0 if ok and not any(r.get("error") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
