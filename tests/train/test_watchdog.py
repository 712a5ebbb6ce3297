"""A stop signal is honoured even while the main thread is stuck in C code; a timed-out collective
is recognised as one (a real 2-process gloo group)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from orchestra.train.watchdog import INTERRUPTED_EXIT_CODE

ROOT = Path(__file__).resolve().parents[2]

STUCK = """
import os, signal, sys, threading, time
from pathlib import Path
from orchestra.train.watchdog import SignalWatchdog

marker = Path(sys.argv[1])
disarm = sys.argv[2] == "disarm"
with SignalWatchdog(1.0, marker) as watchdog:
    # What Lightning does: a Python handler that only records the signal.
    signal.signal(signal.SIGTERM, lambda *a: watchdog.disarm() if disarm else None)
    threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM)).start()
    if disarm:
        time.sleep(2.5)  # the request was taken: the process goes on and ends normally
        print("finished", flush=True)
    else:
        lock = threading.Lock()
        lock.acquire()
        lock.acquire()  # blocked for good, as a rank waiting on a dead peer
"""


def run_stuck(tmp_path: Path, mode: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "stuck.py"
    script.write_text(textwrap.dedent(STUCK))
    return subprocess.run(
        [sys.executable, str(script), str(tmp_path / "interrupted.json"), mode],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def test_an_unanswered_signal_ends_a_stuck_process_with_a_marker(tmp_path: Path) -> None:
    started = time.time()
    proc = run_stuck(tmp_path, "stuck")
    assert proc.returncode == INTERRUPTED_EXIT_CODE, proc.stderr
    assert time.time() - started < 20
    assert "SIGTERM not answered within trainer.signal_grace_s=1 s" in proc.stderr
    assert "lock.acquire()" in proc.stderr  # where the main thread was stuck
    record = json.loads((tmp_path / "interrupted.json").read_text())
    assert "SIGTERM" in record["reason"]


def test_a_signal_taken_at_a_step_boundary_is_not_escalated(tmp_path: Path) -> None:
    proc = run_stuck(tmp_path, "disarm")
    assert proc.returncode == 0 and "finished" in proc.stdout, proc.stderr
    assert not (tmp_path / "interrupted.json").exists()


GLOO = """
import datetime, os, sys
import torch, torch.distributed as dist
from orchestra.train.watchdog import is_collective_timeout

rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method=f"file://{sys.argv[2]}", rank=rank, world_size=2,
                        timeout=datetime.timedelta(seconds=2))
if rank == 0:
    try:
        dist.all_reduce(torch.ones(1))  # rank 1 never joins
    except Exception as err:
        print("timeout" if is_collective_timeout(err) else f"other: {type(err).__name__}: {err}", flush=True)
        os._exit(0)
    os._exit(1)
else:
    import time
    time.sleep(8)
    os._exit(0)
"""


@pytest.mark.slow
def test_a_gloo_collective_timeout_is_recognised(tmp_path: Path) -> None:
    script = tmp_path / "gloo.py"
    script.write_text(textwrap.dedent(GLOO))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    store = tmp_path / "store"
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(r), str(store)], stdout=subprocess.PIPE, text=True, env=env
        )
        for r in (0, 1)
    ]
    out0, _ = procs[0].communicate(timeout=60)
    procs[1].wait(timeout=60)
    assert out0.strip() == "timeout", out0


PEER_KILLED = """
import datetime, os, signal, sys, time
import torch
import torch.distributed as dist
from orchestra.train.watchdog import is_collective_timeout, is_peer_lost

rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method=f"file://{sys.argv[2]}", rank=rank, world_size=2,
                        timeout=datetime.timedelta(seconds=40))
dist.all_reduce(torch.ones(1))  # both ranks are there once
if rank == 1:
    os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer would
time.sleep(1)
started = time.time()
try:
    dist.all_reduce(torch.ones(1))
except Exception as err:
    verdict = "peer-lost" if is_peer_lost(err) and not is_collective_timeout(err) else f"other: {err}"
    print(f"{verdict} after {time.time() - started:.1f} s", flush=True)
    os._exit(0)
os._exit(1)
"""


@pytest.mark.slow
def test_a_rank_killed_mid_job_is_recognised_as_a_lost_peer_not_a_timeout(tmp_path: Path) -> None:
    script = tmp_path / "peer.py"
    script.write_text(textwrap.dedent(PEER_KILLED))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    store = tmp_path / "store"
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(r), str(store)], stdout=subprocess.PIPE, text=True, env=env
        )
        for r in (0, 1)
    ]
    out0, _ = procs[0].communicate(timeout=60)
    procs[1].wait(timeout=60)
    assert out0.startswith("peer-lost"), out0
    assert float(out0.split()[2]) < 30  # at once, not after the 40 s collective timeout
