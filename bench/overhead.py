"""Orchestrator overhead on the CPU debug model: orchestra-train's tokens/s over a bare PyTorch loop's.

    python bench/overhead.py                       # 3 rounds of 10- and 70-step runs of each
    python bench/overhead.py --rounds 5 --threads 2
    python bench/overhead.py --override trainer.progress_bar=false

Both sides do the same training work: the debug model (``orchestra.model.Transformer``), AdamW
with the project's parameter groups and cosine schedule, batches of 16 x 256 tokens, fp32,
gradients clipped to norm 1.0, the same number of torch threads (``--threads``, also exported as
OMP_NUM_THREADS / MKL_NUM_THREADS to both). The bare side is a plain loop over the same token windows
in the same order (the prepared dataset read through the run's sampler: forward with loss,
backward, clip, optimizer and scheduler step, zero_grad), started as a fresh Python process like
orchestra-train, so both are timed the same way: the wall time of the whole process, measured
here, and its CPU time (the process and its children).

What is compared is the *per-step* cost. Each side runs ``--short`` (10) and ``--long`` (70)
steps; the start-up (imports, data checks, model build) and the work at the end of an
orchestra-train run (final validation, last checkpoint, the sample, the summary) are the same in
both runs and cancel in the difference, so a side's tokens/s is (long - short) x tokens per step /
(wall(long) - wall(short)). Mid-run validation and checkpoints are switched off (their interval is
larger than the run): they are periodic work a user chooses, not overhead. Everything else runs as
a user has it: per-step metrics logging to metrics.csv every ``log_every_n_steps`` (10), the
throughput callback, the checkpoint and preemption callbacks, one data-loader worker, and the
Rich progress bar drawing as in a terminal (TTY_COMPATIBLE / TTY_INTERACTIVE, its output going to
a log file).

A shared machine is noisy, so the four runs of a round are interleaved (bare short, bare long,
orchestra short, orchestra long) and the ratio is computed per round; the reported number is the
median of the rounds' ratios (orchestra tokens/s over bare tokens/s; 1.0 = no overhead). Compare
the rounds' spread with the effect before reading much into the median: per-step overhead below
1 % needs a quiet machine or many rounds (``--rounds``) to show.
Rows are appended to bench/results/overhead.csv, one per round, and a markdown table is printed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.benchlib import append_csv, compose_check  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "overhead.csv"
KINDS = ("bare", "orchestra")  # the order of a round: bare short, bare long, orchestra short, long
CSV_FIELDS = [
    "date", "device", "threads", "round", "short_steps", "long_steps", "bare_short_s", "bare_long_s",
    "orchestra_short_s", "orchestra_long_s", "bare_short_cpu_s", "bare_long_cpu_s", "orchestra_short_cpu_s",
    "orchestra_long_cpu_s", "bare_tokens_per_s", "orchestra_tokens_per_s", "ratio", "cpu_ratio",
]  # fmt: skip


@dataclass(frozen=True)
class Timing:
    """One run's wall seconds and CPU seconds (user + system, its child processes included)."""

    wall: float
    cpu: float | None = None


# A run of ``steps`` steps of one kind ("bare" or "orchestra") in round ``r``, timed.
Runner = Callable[[str, int, int], Timing]


def train_overrides(steps: int, run_dir: Path | str, extra: Sequence[str] = ()) -> list[str]:
    """The orchestra-train overrides of one run; the bare loop reads its model/optim config from them too.

    Validation and checkpoints only at the end (intervals past the run), warm-up shorter than the
    short run (the scheduler requires it), a small final validation (it cancels, but costs time).
    """
    return [
        "experiment=debug",
        f"trainer.max_steps={steps}",
        "trainer.micro_batch_size=16",
        "trainer.global_batch_size=16",
        "trainer.precision=32-true",
        "trainer.accelerator=cpu",
        "trainer.grad_clip=1.0",
        "trainer.val_every_n_steps=1000000",
        "trainer.ckpt_every_n_steps=1000000",
        "trainer.val_batches=2",
        "scheduler.warmup_steps=5",
        "energy=none",
        "resume=never",
        "name=bench-overhead",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]


@dataclass
class Round:
    """The four timed runs of one round and what follows from them."""

    index: int
    short: int
    long: int
    tokens_per_step: int
    timings: dict[tuple[str, int], Timing]

    def tokens_per_s(self, kind: str, clock: str = "wall") -> float:
        """(long - short) steps' tokens over the time the extra steps took, by ``clock`` ("wall" or "cpu")."""
        long, short = (getattr(self.timings[(kind, n)], clock) for n in (self.long, self.short))
        if long is None or short is None:
            raise ValueError(f"round {self.index}: no {clock} time for {kind}")
        if long <= short:
            raise ValueError(f"round {self.index}: {kind} {self.long} steps took no longer than {self.short}")
        return (self.long - self.short) * self.tokens_per_step / (long - short)

    @property
    def ratio(self) -> float:
        """orchestra tokens/s over bare tokens/s: the bare loop's Δwall over orchestra's."""
        return self.tokens_per_s("orchestra") / self.tokens_per_s("bare")

    @property
    def cpu_ratio(self) -> float | None:
        """The same from CPU seconds (the process and its data workers, all threads).

        A second view, not a more robust one: on a shared machine it has moved with the wall
        ratio. Where they differ, a side waited (wall ratio lower) rather than worked more.
        """
        if any(t.cpu is None for t in self.timings.values()):
            return None
        return self.tokens_per_s("orchestra", "cpu") / self.tokens_per_s("bare", "cpu")

    def row(self) -> dict[str, Any]:
        cpu = self.cpu_ratio
        return {
            "round": self.index,
            "short_steps": self.short,
            "long_steps": self.long,
            **{f"{k}_{n}_s": round(self.timings[(k, s)].wall, 3) for k in KINDS for n, s in (("short", self.short), ("long", self.long))},
            **{f"{k}_{n}_cpu_s": None if self.timings[(k, s)].cpu is None else round(self.timings[(k, s)].cpu, 3) for k in KINDS for n, s in (("short", self.short), ("long", self.long))},
            "bare_tokens_per_s": round(self.tokens_per_s("bare"), 1),
            "orchestra_tokens_per_s": round(self.tokens_per_s("orchestra"), 1),
            "ratio": round(self.ratio, 4),
            "cpu_ratio": None if cpu is None else round(cpu, 4),
        }  # fmt: skip


def measure(runner: Runner, rounds: int, short: int, long: int, tokens_per_step: int) -> list[Round]:
    """Run every round's four runs interleaved (bare short, bare long, orchestra short, long)."""
    if not 0 < short < long:
        raise ValueError(f"need 0 < short < long steps, got {short} and {long}")
    out = []
    for r in range(rounds):
        timings = {(kind, steps): runner(kind, steps, r) for kind in KINDS for steps in (short, long)}
        out.append(Round(r, short, long, tokens_per_step, timings))
    return out


def median_ratio(rounds: Sequence[Round]) -> float:
    return statistics.median(r.ratio for r in rounds)


def median_cpu_ratio(rounds: Sequence[Round]) -> float | None:
    ratios = [r.cpu_ratio for r in rounds]
    return None if any(x is None for x in ratios) else statistics.median(ratios)  # type: ignore[type-var]


def markdown(rounds: Sequence[Round]) -> str:
    head = ["round", "bare tokens/s", "orchestra tokens/s", "ratio (wall)", "ratio (CPU time)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rounds:
        cpu = "-" if r.cpu_ratio is None else f"{r.cpu_ratio:.3f}"
        lines.append(
            f"| {r.index} | {r.tokens_per_s('bare'):,.0f} | {r.tokens_per_s('orchestra'):,.0f} | {r.ratio:.3f} | {cpu} |"
        )
    cpu = median_cpu_ratio(rounds)
    lines.append(f"| median | | | {median_ratio(rounds):.3f} | {'-' if cpu is None else f'{cpu:.3f}'} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- the two sides


def bare_loop(steps: int, threads: int, overrides: Sequence[str]) -> None:
    """The reference: the same model, data, optimizer, schedule and clipping as the orchestra run, no framework.

    Batches are the run's own: the prepared dataset's windows in the sampler's order (read in
    the loop, one micro-batch per step as the run has it), so both sides compute on the same tokens.
    """
    import torch

    from orchestra.config import padded_vocab_size
    from orchestra.data.dataset import GlobalBatchSampler, PackedDataset
    from orchestra.data.pack import prepare_dataset
    from orchestra.model import build_model
    from orchestra.train.optim import build_optimizer, build_scheduler

    torch.set_num_threads(threads)
    cfg = compose_check(overrides)
    t = cfg.trainer
    dataset = PackedDataset(prepare_dataset(cfg.data, seed=cfg.seed), "train", cfg.model.max_seq_len)
    sampler = GlobalBatchSampler(
        len(dataset),
        t.global_batch_size,
        t.micro_batch_size,
        rank=0,
        world_size=1,
        seed=cfg.seed,
        total_steps=steps,
    )
    torch.manual_seed(cfg.seed)
    vocab = padded_vocab_size(cfg.model, int(dataset.manifest["vocab_size"]))
    model = build_model(cfg.model, vocab, device="cpu").train()
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.scheduler, steps)
    for step in range(steps):
        micro_batches = sampler.step_indices(step)  # one micro-batch at these settings
        for indices in micro_batches:
            inputs, labels = (torch.stack(x) for x in zip(*(dataset[i] for i in indices), strict=True))
            loss = model(inputs, labels)
            (loss / len(micro_batches)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    print(json.dumps({"steps": steps, "loss": float(loss.detach())}))


def thread_env(threads: int) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def subprocess_runner(
    out: Path, threads: int, extra: Sequence[str], progress_terminal: bool = True
) -> Runner:
    """Each run a fresh process timed from here; an orchestra run must report the steps it was asked for."""

    def run(kind: str, steps: int, r: int) -> Timing:
        run_dir = out / f"{kind}-r{r}-{steps}"
        run_dir.mkdir(parents=True, exist_ok=True)
        overrides = train_overrides(steps, run_dir, extra)
        env = thread_env(threads)
        if kind == "bare":
            cmd = [sys.executable, str(Path(__file__).resolve()), "--bare-worker", str(steps),
                   "--threads", str(threads), *(f"--override={o}" for o in extra)]  # fmt: skip
        else:
            cmd = [sys.executable, "-m", "orchestra.cli.train", *overrides]
            if progress_terminal:  # draw the progress bar as in a terminal, into the log file
                env.update({"TTY_COMPATIBLE": "1", "TTY_INTERACTIVE": "1", "COLUMNS": "120"})
        log = run_dir / "console.log"
        with open(log, "wb") as f:
            # One child at a time: the change of RUSAGE_CHILDREN is this run's (its reaped workers too).
            before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
            proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
            wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
        if proc.returncode != 0:
            raise RuntimeError(f"{kind} {steps} steps: exit {proc.returncode}; see {log}")
        if kind == "orchestra":
            done = json.loads((run_dir / "summary.json").read_text())["steps"]
            if done != steps:
                raise RuntimeError(f"orchestra run {run_dir} did {done} steps, not {steps}")
        print(f"round {r}: {kind:9s} {steps:3d} steps {wall:7.2f} s wall {cpu:7.2f} s CPU", flush=True)
        return Timing(wall, cpu)

    return run


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--short", type=int, default=10, help="steps of the short runs")
    parser.add_argument("--long", type=int, default=70, help="steps of the long runs")
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="torch threads of both sides"
    )
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a Hydra override for both sides (repeatable), e.g. model.dim=128",
    )
    parser.add_argument(
        "--plain-output",
        action="store_true",
        help="let orchestra-train see a plain file (the progress bar draws once, at the end)",
    )
    parser.add_argument("--out", type=Path, default=None, help="run dirs (default: a temp dir)")
    parser.add_argument("--csv", type=Path, default=RESULTS)
    parser.add_argument("--bare-worker", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for o in args.override:
        if "=" not in o:
            parser.error(f"--override {o!r}: expected KEY=VALUE")
    if not 0 < args.short < args.long:
        parser.error(f"--short {args.short} must be positive and smaller than --long {args.long}")
    if args.rounds < 1 or args.threads < 1:
        parser.error("--rounds and --threads must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.bare_worker is not None:
        bare_loop(args.bare_worker, args.threads, train_overrides(args.bare_worker, "unused", args.override))
        return
    out = args.out or Path(tempfile.mkdtemp(prefix="orchestra-overhead-"))
    for steps in (args.short, args.long):  # every command composes and validates before anything runs
        cfg = compose_check(train_overrides(steps, out / "check", args.override))
    tokens_per_step = cfg.trainer.global_batch_size * cfg.model.max_seq_len
    runner = subprocess_runner(out, args.threads, args.override, progress_terminal=not args.plain_output)
    # Untimed: the first run prepares the dataset and warms the file cache for every later one.
    runner("bare", 1, -1)
    rounds = measure(runner, args.rounds, args.short, args.long, tokens_per_step)

    import torch

    device = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    date = dt.date.today().isoformat()
    base = {"date": date, "device": device, "threads": args.threads}
    append_csv(args.csv, CSV_FIELDS, [{**base, **r.row()} for r in rounds])
    print(f"\nDevice: {device}, {args.threads} torch threads — {date} — torch {torch.__version__}")
    print(f"tokens/s from ({args.long} - {args.short}) steps x {tokens_per_step} tokens / Δwall\n")
    print(markdown(rounds))
    cpu = median_cpu_ratio(rounds)
    print(
        f"\norchestra / bare tokens/s, median of {len(rounds)} interleaved rounds: {median_ratio(rounds):.3f}"
        + ("" if cpu is None else f" (from CPU time: {cpu:.3f})")
    )
    print(f"appended to {args.csv}; run dirs under {out}")


if __name__ == "__main__":
    main()
