"""Randomized fault injection for training jobs: signal a random rank at a random step.

A :class:`FaultPlan` draws, from one seed, which signal (SIGKILL, SIGTERM, SIGUSR1) goes to which
rank at which step of each cycle; the tests drive a job through the cycles, restarting it (or
letting Slurm requeue it) after each, and compare its per-step losses with an uninterrupted run.
Ranks are found through /proc: the processes of the job whose environment names their rank.
"""

from __future__ import annotations

import csv
import os
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

SIGNALS = (signal.SIGKILL, signal.SIGTERM, signal.SIGUSR1)


@dataclass
class Fault:
    """One injected fault and what became of it."""

    cycle: int
    what: str  # a signal name, or "node-down"
    rank: int
    after_step: int  # the newest logged step when it was sent
    delay_s: float  # extra wait after that step was seen (lands mid-step or mid-save)
    outcome: str = ""


class FaultPlan:
    """The faults of a run, drawn from ``seed`` so a failing run can be replayed."""

    def __init__(self, seed: int, cycles: int, world_size: int, extra: tuple[str, ...] = ()) -> None:
        self.rng = random.Random(seed)
        self.cycles, self.world_size = cycles, world_size
        self.kinds = [s.name for s in SIGNALS] + list(extra)

    def draw(self, cycle: int, newest_step: int, ckpt_every: int) -> tuple[Fault, int]:
        """The next fault and the step to wait for before sending it (past the next checkpoint or not)."""
        # Every kind at least once over the first cycles, then at random.
        what = self.kinds[cycle] if cycle < len(self.kinds) else self.rng.choice(self.kinds)
        target = newest_step + self.rng.randint(1, 2 * ckpt_every)
        fault = Fault(cycle, what, self.rng.randrange(self.world_size), target, self.rng.uniform(0.0, 0.4))
        return fault, target


def logged_steps(run_dir: Path) -> int:
    """The newest step with a train/loss row (-1: none), tolerating a row being written now."""
    try:
        with open(run_dir / "metrics.csv", newline="") as f:
            steps = [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]
        return max(steps, default=-1)
    except (FileNotFoundError, ValueError, TypeError, KeyError):
        return -1


def losses(run_dir: Path) -> dict[int, str]:
    """Per-step training losses as written (strings: compared bit for bit)."""
    with open(run_dir / "metrics.csv", newline="") as f:
        return {int(r["step"]): r["train/loss"] for r in csv.DictReader(f) if r.get("train/loss")}


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def rank_pids(match: Callable[[dict[str, str]], bool], rank_var: str = "RANK") -> dict[int, int]:
    """{rank: pid} of the training processes whose environment ``match`` accepts."""
    found: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        pid = int(entry.name)
        if "orchestra.cli.train" not in _cmdline(pid):
            continue
        env = _environ(pid)
        if rank_var in env and match(env):
            found.setdefault(int(env[rank_var]), pid)
    return found


def wait_for_step(run_dir: Path, step: int, alive: Callable[[], bool], timeout: float) -> int:
    """Wait until ``step`` is logged (returns the newest step) or the job is gone (returns -2)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        newest = logged_steps(run_dir)
        if newest >= step:
            return newest
        if not alive():
            return -2
        time.sleep(0.05)
    raise AssertionError(f"step {step} not logged in {timeout} s (newest {logged_steps(run_dir)})")


def send(pids: dict[int, int], fault: Fault) -> bool:
    """Send the fault's signal to its rank; False if that rank is already gone."""
    pid = pids.get(fault.rank)
    if pid is None:
        return False
    try:
        os.kill(pid, signal.Signals[fault.what])
    except ProcessLookupError:
        return False
    return True
