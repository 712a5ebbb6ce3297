"""Stop signals are honoured even when the training process is stuck in C code.

Python runs a signal handler only when the main thread returns to the interpreter. A rank blocked
in a collective whose peer is gone, or in a DataLoader whose worker deadlocked, never does: the
handlers Lightning and :class:`~orchestra.train.callbacks.preemption.PreemptionCallback` install
for SIGTERM / SIGUSR1 then swallow the signal, and the job ignores everything but SIGKILL.

The C-level part of Python's handler still runs at once and writes the signal number to the
"wakeup fd" (:func:`signal.set_wakeup_fd`). :class:`SignalWatchdog` reads that fd in a thread: on
a stop signal it starts a grace period; a step boundary that takes the request (the preemption
callback's save) disarms it; otherwise it prints where the main thread is stuck, writes a marker
and ends the process with :data:`INTERRUPTED_EXIT_CODE`, which slurm/*.sh requeue (the job
resumes from its newest checkpoint). Collective timeouts (``trainer.collective_timeout_s``) end in
the same exit, through :func:`exit_interrupted`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from types import TracebackType

from orchestra.io import atomic_write_text

# 0 done, 1 Hydra error, 2 clear config/data error, 3 preempted with a checkpoint (preemption.py).
INTERRUPTED_EXIT_CODE = 4
INTERRUPTED_MARKER = "interrupted.json"


def main_thread_stack() -> str:
    frame = sys._current_frames().get(threading.main_thread().ident or -1)
    return "".join(traceback.format_stack(frame)) if frame is not None else "(main thread not found)\n"


def exit_interrupted(marker: Path | None, reason: str, detail: str = "") -> None:
    """Write the marker, say why on stderr and end the process now (no atexit, no teardown).

    ``os._exit`` on purpose: a clean interpreter exit would join the stuck threads and destroy the
    process group, which blocks on the same dead peer.
    """
    record = {"reason": reason, "pid": os.getpid(), "time": time.time(), "rank": os.environ.get("RANK")}
    with contextlib.suppress(OSError):
        if marker is not None:
            atomic_write_text(marker, json.dumps(record) + "\n")
    sys.stderr.write(f"orchestra: {reason}; exiting with code {INTERRUPTED_EXIT_CODE}\n{detail}")
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(INTERRUPTED_EXIT_CODE)


class SignalWatchdog:
    """Escalates an unanswered stop signal to :func:`exit_interrupted` after ``grace_s`` seconds.

    Use as a context manager around the run, from the main thread. ``grace_s <= 0`` disables it.
    """

    def __init__(
        self,
        grace_s: float,
        marker: Path | None,
        signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGUSR1),
    ) -> None:
        self.grace_s = grace_s
        self.marker = marker
        self.signals = {int(s) for s in signals}
        self._disarmed = threading.Event()
        self._armed = False
        self._read_fd = self._write_fd = -1
        self._previous_fd: int | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> SignalWatchdog:
        if self.grace_s <= 0 or threading.current_thread() is not threading.main_thread():
            return self
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._write_fd, False)
        self._previous_fd = signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
        self._thread = threading.Thread(target=self._watch, name="orchestra-signal-watchdog", daemon=True)
        self._thread.start()
        return self

    def disarm(self) -> None:
        """The request was taken at a step boundary: no escalation for it."""
        self._disarmed.set()

    def _watch(self) -> None:
        while True:
            try:
                data = os.read(self._read_fd, 64)
            except OSError:
                return
            if not data:  # closed by __exit__
                return
            received = [n for n in data if n in self.signals]
            if received and not self._armed:
                self._armed = True
                name = signal.Signals(received[0]).name
                threading.Thread(target=self._escalate, args=(name,), daemon=True).start()

    def _escalate(self, name: str) -> None:
        if self._disarmed.wait(self.grace_s):
            return
        exit_interrupted(
            self.marker,
            f"{name} not answered within trainer.signal_grace_s={self.grace_s:g} s (the process is stuck)",
            "main thread:\n" + main_thread_stack(),
        )

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._thread is None:
            return
        with contextlib.suppress(ValueError):
            signal.set_wakeup_fd(self._previous_fd if self._previous_fd is not None else -1)
        os.close(self._write_fd)  # ends the reader
        self._thread.join(timeout=5)
        os.close(self._read_fd)
        self._thread = None


def is_collective_timeout(err: BaseException) -> bool:
    """A collective that waited past the process group's timeout (gloo raises, NCCL aborts).

    torch raises a RuntimeError (its DistError subclasses it) whose message says so.
    """
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("timed out" in text or "timeout" in text)


# What gloo and NCCL say when the process at the other end of a collective is gone.
_PEER_LOST = (
    "connection closed by peer",
    "connection reset by peer",
    "broken pipe",
    "connection refused",
    "remote process exited",
    "socket closed",
)


def is_peer_lost(err: BaseException) -> bool:
    """A collective that failed because another rank died (killed, its node down).

    That rank's job is not wrong, only interrupted: like a timeout it exits with code 4, which
    the batch scripts requeue, and never with the code of an error worth reporting.
    """
    import torch.distributed as dist

    network_error = getattr(dist, "DistNetworkError", ())
    if network_error and isinstance(err, network_error):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and any(p in text for p in _PEER_LOST)
