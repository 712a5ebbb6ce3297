"""Preemption: checkpoint at a step boundary on a warning signal, then stop with a known status.

Slurm warns a job before it preempts it or hits its time limit (``--signal=B:USR1@lead`` and, at
the end, SIGTERM). Saving inside the signal handler is what hangs or tears checkpoints in other
trainers: a save under DDP/FSDP/DeepSpeed is a collective, and the handler runs at an arbitrary
point on each rank (maybe in the middle of a save). So the handler here only sets a flag. At
every optimizer-step boundary all ranks all-reduce the flag with MAX, so they agree on the same
step even when the signal reached only some of them; then every rank takes part in one ordinary
checkpoint save (atomic through the trainer's CheckpointIO), rank zero writes a marker, and the
trainer stops. :func:`orchestra.train.run.train` then exits with :data:`PREEMPTED_EXIT_CODE`,
which slurm/pretrain.sh reads as "checkpoint saved, requeue me".
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import time
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback

from orchestra.io import atomic_link, atomic_write_text
from orchestra.train.checkpoint.manifest import copy_manifest
from orchestra.train.watchdog import SignalWatchdog

log = logging.getLogger(__name__)

# Distinct from 0 (done), 1 (Hydra/unhandled error) and 2 (orchestra's clear config/data errors).
PREEMPTED_EXIT_CODE = 3
MARKER_NAME = "preempted.json"
# The batch script may name the marker itself (it need not know the run dir).
MARKER_ENV = "ORCHESTRA_PREEMPT_MARKER"


def parse_signal(name: str) -> signal.Signals:
    """``USR1``, ``SIGUSR1`` or ``10`` -> ``signal.SIGUSR1``; anything else names what is accepted."""
    text = name.strip().upper()
    if text.isdigit():
        return signal.Signals(int(text))
    key = text if text.startswith("SIG") else f"SIG{text}"
    try:
        return signal.Signals[key]
    except KeyError:
        raise ValueError(f"unknown signal {name!r}: use a name such as USR1, USR2 or TERM") from None


class PreemptionCallback(Callback):
    """Turns a warning signal into a checkpoint at the next optimizer step and a clean stop.

    Args:
        checkpoint_dir: where step checkpoints go (the run dir's ``checkpoints/``).
        marker_path: the file written once the checkpoint is on disk.
        signals: signals that request the checkpoint; the handlers are installed for the fit only
            and the previous ones restored afterwards.
        watchdog: told when a request is taken at a step boundary (it ends a process that never
            gets there, see orchestra/train/watchdog.py).
    """

    def __init__(
        self,
        checkpoint_dir: str | Path,
        marker_path: str | Path,
        signals: tuple[str, ...] = ("USR1", "TERM"),
        watchdog: SignalWatchdog | None = None,
    ) -> None:
        self.checkpoint_dir = Path(checkpoint_dir)
        self.marker_path = Path(marker_path)
        self.signals = tuple(dict.fromkeys(parse_signal(s) for s in signals))
        self.requested: signal.Signals | None = None
        self.saved_path: Path | None = None
        self._previous: dict[signal.Signals, Any] = {}
        self._last_step = -1
        self.watchdog = watchdog

    @property
    def preempted(self) -> bool:
        """True once the checkpoint has been saved and training was stopped for it."""
        return self.saved_path is not None

    # -- signal handling: nothing but a flag ---------------------------------------------------

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # Async-signal context: no I/O, no collectives, no locks. The step boundary does the work.
        if self.requested is None:
            self.requested = signal.Signals(signum)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        for sig in self.signals:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. a notebook worker): cannot preempt safely
                log.warning("preemption: cannot install a %s handler outside the main thread", sig.name)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        for sig, previous in self._previous.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_step = trainer.global_step
        if not trainer.is_global_zero:
            return
        with contextlib.suppress(FileNotFoundError):
            self.marker_path.unlink()  # from the attempt this one resumes
        restart = os.environ.get("SLURM_RESTART_COUNT")
        if restart is not None:
            # Beside the losses, so a plot shows where a run was requeued (W&B and metrics.csv).
            for logger in trainer.loggers:
                logger.log_metrics({"slurm/restart_count": float(restart)}, step=trainer.global_step)

    # -- the step boundary: agree, save, stop --------------------------------------------------

    def _agreed(self, trainer: L.Trainer) -> bool:
        """Whether any rank was signalled; the same answer on every rank."""
        flag = self.requested is not None
        if dist.is_available() and dist.is_initialized() and trainer.world_size > 1:
            # On the strategy's device: NCCL only reduces CUDA tensors.
            tensor = torch.tensor([1 if flag else 0], dtype=torch.int32, device=trainer.strategy.root_device)
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
            flag = bool(tensor.item())
        return flag

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Only at optimizer-step boundaries: between micro-batches of an accumulation the
        # optimizer state and gradients are not a resumable point. Every rank reaches the same
        # boundaries, so every rank calls the all-reduce equally often.
        if trainer.global_step == self._last_step or self.preempted:
            return
        self._last_step = trainer.global_step
        if not self._agreed(trainer):
            return
        if self.watchdog is not None:
            self.watchdog.disarm()  # the request is taken: the save may take as long as it takes
        if trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
            return  # the run is finishing anyway: nothing to requeue
        self._save_and_stop(trainer)

    def _save_and_stop(self, trainer: L.Trainer) -> None:
        step = trainer.global_step
        path = self.checkpoint_dir / f"step{step:07d}.ckpt"
        started = time.time()
        trainer.save_checkpoint(path)  # collective; atomic through AtomicCheckpointIO
        finish = getattr(trainer.strategy, "finish_checkpoint", None)
        if finish is not None:  # strategy.async_checkpoint: the job must not end before it is written
            finish()
        if trainer.is_global_zero and path.is_file():
            # last.ckpt follows the newest checkpoint; a hard link is instant and atomic by rename.
            with contextlib.suppress(OSError):
                atomic_link(path, self.checkpoint_dir / "last.ckpt")
                copy_manifest(path, self.checkpoint_dir / "last.ckpt")
        self.saved_path = path
        if trainer.is_global_zero:
            signame = self.requested.name if self.requested is not None else "another rank"
            self._write_marker(
                {
                    "step": step,
                    "checkpoint": str(path),
                    "signal": signame,
                    "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
                    "save_s": round(time.time() - started, 3),
                    "time": time.time(),
                }
            )
            print(
                f"preemption: {signame} received; checkpoint {path} saved at step {step}; stopping "
                f"(exit code {PREEMPTED_EXIT_CODE})",
                flush=True,
            )
        # No rank may exit before the marker exists: srun --kill-on-bad-exit would end rank zero.
        trainer.strategy.barrier("orchestra-preemption-marker")
        trainer.should_stop = True

    def _write_marker(self, record: dict[str, Any]) -> None:
        paths = {self.marker_path}
        if os.environ.get(MARKER_ENV):
            paths.add(Path(os.environ[MARKER_ENV]))
        for path in paths:
            atomic_write_text(path, json.dumps(record) + "\n")
