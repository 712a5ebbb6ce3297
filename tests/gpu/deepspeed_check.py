"""Lightning's DeepSpeedStrategy end to end on one GPU: train, save, resume, export, compare logits.

    python tests/gpu/deepspeed_check.py                               # ZeRO-3 then ZeRO-2, debug model
    python -m tests.gpu.deepspeed_check --strategies deepspeed_zero2 --steps 60 model.kernels=torch
    python -m pytest tests/gpu                      # ZeRO-2 and ZeRO-3 for 8 steps (skipped without CUDA)

Lightning refuses DeepSpeed on CPU, so the CPU test suite drives DeepSpeed directly
(tests/distributed); this runs the real `orchestra-train strategy=deepspeed_zero*` path. For each
strategy:

1. **reference**: `orchestra-train` for ``--steps`` steps with a checkpoint every ``steps / 2``
   (DeepSpeed's directory format, written atomically).
2. **resume**: a copy of that run dir cut back to the half-way checkpoint (later checkpoints, the
   metrics rows from there on and summary.json removed), then the same command with
   ``resume=auto`` in the copy: it resumes from step ``steps / 2`` and trains to ``steps``. Its
   ``train/loss`` at every logged step must equal the reference's within ``--tol`` (the first
   logged step after the resume within ``--tol-first``). Exact equality is not expected on a GPU:
   flash attention's backward accumulates with atomics, so even two uninterrupted runs differ in
   the last bits, and the difference grows with the steps.
3. **export**: `orchestra-export` of the reference's final checkpoint to a Hugging Face folder, loaded
   with ``transformers.AutoModelForCausalLM`` (fp32, CPU) and compared with
   ``orchestra.train.checkpoint.load_model_from_checkpoint`` on random tokens: logits within
   ``--logits-atol``.

Any mismatch or failed command exits non-zero with a message naming the strategy and the step.
Without a CUDA GPU it exits with a message.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a file: bench/ and orchestra/ are packages of the root
    sys.path.insert(0, str(ROOT))

from bench.benchlib import compose_check, read_losses  # noqa: E402

# `single` (one file per checkpoint, any device) runs the same save/resume/export check without
# DeepSpeed, e.g. on a CPU machine to try the script itself.
STRATEGIES = ["deepspeed_zero1", "deepspeed_zero2", "deepspeed_zero3", "single"]
PRESETS = ["debug", "llama-125m"]


class CheckFailed(Exception):
    """A step of the check found a mismatch or a failed command."""


def train_overrides(
    strategy: str, preset: str, steps: int, run_dir: Path | str, extra: Sequence[str] = ()
) -> list[str]:
    """The `orchestra-train` overrides of the reference run (the resumed run adds resume=auto)."""
    if steps < 4 or steps % 2:
        raise ValueError(f"--steps must be an even number >= 4, got {steps}")
    return [
        "experiment=debug",
        *([] if preset == "debug" else [f"model={preset}", "model.max_seq_len=1024"]),
        f"strategy={strategy}",
        "trainer.micro_batch_size=8",
        "trainer.global_batch_size=8",
        f"trainer.max_steps={steps}",
        f"trainer.ckpt_every_n_steps={steps // 2}",
        "trainer.keep_last_checkpoints=4",
        f"trainer.val_every_n_steps={steps}",
        "trainer.val_batches=2",
        "trainer.log_every_n_steps=2",
        "scheduler.warmup_steps=4",
        "trainer.progress_bar=false",
        "trainer.sample_tokens=8",
        "energy=none",
        f"name=ds-check-{strategy}",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]


@dataclass
class LossComparison:
    steps: int  # logged steps compared
    max_diff: float
    first_step: int | None
    first_diff: float
    missing: list[int]  # reference steps the resumed run did not log

    def ok(self, tol: float, tol_first: float) -> bool:
        return self.steps > 0 and not self.missing and self.max_diff <= tol and self.first_diff <= tol_first


def compare_losses(reference: dict[int, float], resumed: dict[int, float], from_step: int) -> LossComparison:
    """Resumed-run losses against the reference at every reference step >= ``from_step``."""
    wanted = sorted(s for s in reference if s >= from_step)
    shared = [s for s in wanted if s in resumed]
    diffs = [abs(reference[s] - resumed[s]) for s in shared]
    return LossComparison(
        steps=len(shared),
        max_diff=max(diffs, default=0.0),
        first_step=shared[0] if shared else None,
        first_diff=diffs[0] if diffs else 0.0,
        missing=[s for s in wanted if s not in resumed],
    )


def cut_metrics(metrics_csv: Path, from_step: int) -> int:
    """Drop the rows of steps >= ``from_step`` (what the resumed run must log again); rows kept."""
    with open(metrics_csv, newline="") as f:
        reader = csv.DictReader(f)
        fields = list(reader.fieldnames or [])
        rows = [r for r in reader if r.get("step") not in (None, "") and int(float(r["step"])) < from_step]
    with open(metrics_csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return len(rows)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(cmd: list[str], what: str, log: Path, env: dict[str, str]) -> float:
    print(f"[{what}] $ {' '.join(cmd[2:]) if cmd[1] == '-m' else ' '.join(cmd)}  (log: {log})", flush=True)
    started = time.time()
    with open(log, "w") as f:
        code = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if code != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-30:])
        raise CheckFailed(f"{what}: exit {code}; last lines of {log}:\n{tail}")
    return time.time() - started


def compare_logits(ckpt: Path, hf_dir: Path, seed: int = 0) -> float:
    """Largest |logits| difference between the exported HF folder and our model of the checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM

    from orchestra.train.checkpoint.load import load_model_from_checkpoint

    ours, _, meta = load_model_from_checkpoint(ckpt)
    ours = ours.float().eval()
    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), torch_dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, meta.vocab_size, (2, 64), generator=g)
    with torch.no_grad():
        a, b = ours(tokens), hf(tokens).logits
    if a.shape != b.shape:
        raise CheckFailed(f"export of {ckpt}: logits shape {tuple(b.shape)} != ours {tuple(a.shape)}")
    return float((a - b).abs().max())


def check_strategy(strategy: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    from orchestra.train.checkpoint import checkpoint_step, find_resume_checkpoint

    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
    }
    ref_dir, res_dir = out / f"{strategy}-reference", out / f"{strategy}-resumed"
    shutil.rmtree(ref_dir, ignore_errors=True)
    shutil.rmtree(res_dir, ignore_errors=True)
    overrides = train_overrides(strategy, args.preset, args.steps, ref_dir, args.overrides)
    half = args.steps // 2
    timings: dict[str, float] = {}
    train = [sys.executable, "-m", "orchestra.cli.train"]

    timings["reference_s"] = _run(
        [*train, *overrides], f"{strategy} reference", out / f"{strategy}-reference.log", env
    )
    ckpts = {p: checkpoint_step(p) for p in (ref_dir / "checkpoints").glob("*.ckpt")}
    if half not in ckpts.values():
        raise CheckFailed(f"{strategy}: no checkpoint of step {half} in {ref_dir / 'checkpoints'}: {ckpts}")
    final = find_resume_checkpoint(ref_dir)
    if final is None or checkpoint_step(final) != args.steps:
        raise CheckFailed(f"{strategy}: the newest checkpoint is {final}, not one of step {args.steps}")

    # The "requeued job": the run dir as it was when the half-way checkpoint had just been written.
    shutil.copytree(ref_dir, res_dir, symlinks=True)
    for path in (res_dir / "checkpoints").glob("*.ckpt"):
        if checkpoint_step(path) > half:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    (res_dir / "summary.json").unlink(missing_ok=True)
    cut_metrics(res_dir / "metrics.csv", half)
    resumed_overrides = [
        *train_overrides(strategy, args.preset, args.steps, res_dir, args.overrides),
        "resume=auto",
    ]
    timings["resume_s"] = _run(
        [*train, *resumed_overrides], f"{strategy} resume", out / f"{strategy}-resumed.log", env
    )
    summary = json.loads((res_dir / "summary.json").read_text())
    if not summary.get("resumed_from") or summary.get("steps") != args.steps:
        raise CheckFailed(
            f"{strategy}: the rerun did not resume to step {args.steps}: "
            f"resumed_from={summary.get('resumed_from')}, steps={summary.get('steps')}"
        )
    # Lightning logs the step that completes optimizer step k as step k - 1.
    comparison = compare_losses(
        read_losses(ref_dir / "metrics.csv"), read_losses(res_dir / "metrics.csv"), half
    )
    result: dict[str, Any] = {
        "strategy": strategy,
        "resumed_from": Path(summary["resumed_from"]).name,
        "compared_steps": comparison.steps,
        "first_step": comparison.first_step,
        "first_diff": comparison.first_diff,
        "max_loss_diff": comparison.max_diff,
        **timings,
    }
    if not comparison.ok(args.tol, args.tol_first):
        raise CheckFailed(
            f"{strategy}: resumed losses differ from the uninterrupted run: max |diff| {comparison.max_diff:.4g} "
            f"(tol {args.tol}), first logged step {comparison.first_step} |diff| {comparison.first_diff:.4g} "
            f"(tol {args.tol_first}), {comparison.steps} steps compared, missing {comparison.missing}"
        )

    hf_dir = out / f"{strategy}-hf"
    shutil.rmtree(hf_dir, ignore_errors=True)
    export = [sys.executable, "-m", "orchestra.cli.export", f"ckpt={final}", f"out={hf_dir}", "dtype=float32"]
    timings["export_s"] = _run(export, f"{strategy} export", out / f"{strategy}-export.log", env)
    result["export_s"] = timings["export_s"]
    result["max_logits_diff"] = compare_logits(final, hf_dir)
    if result["max_logits_diff"] > args.logits_atol:
        raise CheckFailed(
            f"{strategy}: exported logits differ from ours by {result['max_logits_diff']:.3g} "
            f"(atol {args.logits_atol}); checkpoint {final}, folder {hf_dir}"
        )
    return result


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--strategies", nargs="+", default=["deepspeed_zero3", "deepspeed_zero2"], choices=STRATEGIES
    )
    parser.add_argument("--preset", default="debug", choices=PRESETS)
    parser.add_argument(
        "--steps", type=int, default=40, help="even; the checkpoint resumed from is at steps / 2"
    )
    parser.add_argument(
        "--tol", type=float, default=5e-2, help="largest |train/loss difference| after the resume"
    )
    parser.add_argument(
        "--tol-first", type=float, default=1e-2, help="the same at the first logged step after it"
    )
    parser.add_argument("--logits-atol", type=float, default=1e-4, help="exported vs our logits (fp32, CPU)")
    parser.add_argument("--out", type=Path, default=None, help="run dirs and logs (default: a temp dir)")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for both runs")
    args = parser.parse_args(argv)
    if args.steps < 4 or args.steps % 2:
        parser.error("--steps must be an even number >= 4")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    for strategy in args.strategies:  # every command composes and validates before anything runs
        compose_check(train_overrides(strategy, args.preset, args.steps, "unused", args.overrides))

    import torch

    if not torch.cuda.is_available() and any(s.startswith("deepspeed") for s in args.strategies):
        sys.exit(
            "tests/gpu/deepspeed_check.py runs Lightning's DeepSpeedStrategy, which needs a CUDA GPU; "
            "this machine has none (nothing was run)"
        )
    out = args.out or Path(tempfile.mkdtemp(prefix="orchestra-ds-check-"))
    out.mkdir(parents=True, exist_ok=True)
    results, failures = [], []
    for strategy in args.strategies:
        try:
            results.append(check_strategy(strategy, args, out))
            print(f"[{strategy}] OK: {json.dumps(results[-1])}", flush=True)
        except CheckFailed as err:
            failures.append(str(err))
            print(f"[{strategy}] FAILED: {err}", flush=True)
    keys = [
        "strategy",
        "resumed_from",
        "compared_steps",
        "first_diff",
        "max_loss_diff",
        "max_logits_diff",
        "reference_s",
        "resume_s",
        "export_s",
    ]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"\nSave / resume / export through Lightning on 1 x {device}, {args.preset}, {args.steps} steps\n")
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in results:
        cells = [f"{r[k]:.3g}" if isinstance(r.get(k), float) else str(r.get(k, "-")) for k in keys]
        print("| " + " | ".join(cells) + " |")
    if failures:
        print("\nFAILED:\n" + "\n".join(f"- {f.splitlines()[0]}" for f in failures), file=sys.stderr)
        return 1
    print("\nall strategies: resume matches the uninterrupted run, export matches our logits")
    return 0


if __name__ == "__main__":
    sys.exit(main())
