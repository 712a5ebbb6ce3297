"""Periodic checkpoints: Lightning's ModelCheckpoint with one name per meaning and a safe retention.

Two Lightning behaviours are changed here (read against the version in lightning_compat.py):

- ``last.ckpt`` is replaced, never versioned. Lightning's version counter writes ``last-v1.ckpt``
  when ``last.ckpt`` exists and is not the path it remembers; after a preemption (whose hard link
  refreshes last.ckpt) and a requeue that left users reading a stale last.ckpt. The write itself
  is atomic (AtomicCheckpointIO, or the strategy's directory save), so replacing is safe.
- Retention deletes an old checkpoint only while the newest one is intact (its files match its
  manifest by size): a save that went wrong never costs the last good checkpoint.

:meth:`RunCheckpoint.pause` stops all saving for the rest of a fit: the loss guard pauses it
when a step must not be kept (a rollback or a stop), so no checkpoint records that step.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from orchestra.train.checkpoint.manifest import verify_checkpoint
from orchestra.train.checkpoint.meta import CheckpointError

log = logging.getLogger(__name__)


class RunCheckpoint(ModelCheckpoint):
    """ModelCheckpoint over step files ``step<N>.ckpt`` plus ``last.ckpt`` (see the module docstring)."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("enable_version_counter", False)
        super().__init__(**kwargs)
        self.paused: str | None = None

    def pause(self, reason: str) -> None:
        """Write no more checkpoints in this fit (``reason`` is logged)."""
        if self.paused is None:
            log.warning("checkpoints paused: %s", reason)
        self.paused = reason

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        # A resumed run starts at a step its checkpoint already holds. Lightning does not keep
        # "saved at this step" across a restart, so with gradient accumulation it saved that step
        # again at the end of the first micro-batch, overwriting the good checkpoint with loop
        # counters in the middle of a step (found by the fault-injection test: a second resume
        # from it was no longer exact).
        self._last_global_step_saved = trainer.global_step

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if self.best_k_models and self.kth_best_model_path not in self.best_k_models:
            # The run that saved this kept another number of checkpoints
            # (trainer.keep_last_checkpoints): Lightning restores its k-th best as '' and fails
            # on the next save looking it up. The k-th is the one retention would delete next.
            worst = min if self.mode == "max" else max
            self.kth_best_model_path = worst(self.best_k_models, key=lambda p: float(self.best_k_models[p]))
            self.kth_value = self.best_k_models[self.kth_best_model_path]

    def _should_skip_saving_checkpoint(self, trainer: L.Trainer) -> bool:
        return self.paused is not None or super()._should_skip_saving_checkpoint(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.paused is None:
            super().on_train_end(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        # strategy.async_checkpoint: a save whose files are all written is published between
        # steps, before this step's own save (if any) is started.
        publish = getattr(trainer.strategy, "publish_if_done", None)
        if publish is not None:
            publish()
        super().on_train_batch_end(trainer, *args, **kwargs)

    def _remove_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        newest = self._last_checkpoint_saved
        pending = getattr(trainer.strategy, "pending_checkpoint", None)
        if pending is not None and newest and Path(newest) == Path(pending):
            # The newest is still being written in the background: delete the old one only once
            # it is published (and then only if it is intact, below).
            trainer.strategy.after_publish(lambda: self._remove_checkpoint(trainer, filepath))  # type: ignore[attr-defined]
            return
        if newest and Path(newest) != Path(filepath):
            try:
                verify_checkpoint(newest, hashes=False)
            except CheckpointError as err:
                if trainer.is_global_zero:
                    log.warning("keeping %s: the newest checkpoint is not intact (%s)", filepath, err)
                return
        super()._remove_checkpoint(trainer, filepath)
