"""The training progress bar: optimizer steps of ``trainer.max_steps``, not Lightning's epochs.

A run here is one epoch bounded by ``max_steps`` (``max_epochs=-1``), so Lightning's
RichProgressBar titles it "Epoch 0/-2" and counts micro-batches, ``accumulate_grad_batches`` of
them per optimizer step. This bar shows ``step <done>/<max_steps>`` in optimizer steps
(``trainer.global_step``, so a resumed run starts at its restored step), and its speed and ETA
are those of optimizer steps. Validation bars are Lightning's.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import (
    BatchesProcessedColumn,
    ProcessingSpeedColumn,
    RichProgressBarTheme,
)
from rich.console import RenderableType
from rich.progress import Task
from rich.text import Text

# Redraws per second. Lightning's 100 wakes a thread every 10 ms; a bar that moves once per
# optimizer step (a second or more on a CPU) reads the same at 4.
DEFAULT_REFRESH_RATE = 4


def _is_train_bar(bar: StepProgressBar, task: Task) -> bool:
    """The train bar, also in the frame drawn while it is being added (before its id is known)."""
    if bar.train_progress_bar_id is None:
        return bar._trainer is not None and bar.trainer.training
    return task.id == bar.train_progress_bar_id


class _CountColumn(BatchesProcessedColumn):
    """Lightning's "done/total" for validation; nothing for the train bar, whose description holds it."""

    def __init__(self, bar: StepProgressBar, style: Any) -> None:
        self._bar = bar
        super().__init__(style)

    def render(self, task: Task) -> RenderableType:
        return Text() if _is_train_bar(self._bar, task) else super().render(task)


class _SpeedColumn(ProcessingSpeedColumn):
    """Optimizer steps per second on the train bar (seconds per step when slower than one a second)."""

    def __init__(self, bar: StepProgressBar, style: Any) -> None:
        self._bar = bar
        super().__init__(style)

    def render(self, task: Task) -> RenderableType:
        if not _is_train_bar(self._bar, task):
            return super().render(task)
        speed = task.speed
        if not speed:
            return Text("-- s/step", style=self.style)
        return Text(f"{speed:.2f} steps/s" if speed >= 1 else f"{1 / speed:.1f} s/step", style=self.style)


class StepProgressBar(RichProgressBar):
    """RichProgressBar counting optimizer steps of ``max_steps``: "step 40/300"."""

    def __init__(
        self,
        refresh_rate: int = DEFAULT_REFRESH_RATE,
        leave: bool = True,
        theme: RichProgressBarTheme | None = None,
        console_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(
            refresh_rate=refresh_rate,
            leave=leave,
            theme=theme or RichProgressBarTheme(),
            console_kwargs=console_kwargs,
        )
        self._shown_step = -1

    def _get_train_description(self, current_epoch: int) -> str:
        trainer = self.trainer
        if trainer.max_steps is None or trainer.max_steps <= 0:  # no step budget: Lightning's epochs
            return super()._get_train_description(current_epoch)
        total = trainer.max_steps
        # Padded to its widest ("step 300/300") so the bar does not shift as the count grows.
        return f"{f'step {trainer.global_step}/{total}':<{len(f'step {total}/{total}')}}"

    def configure_columns(self, trainer: L.Trainer) -> list:
        columns = super().configure_columns(trainer)
        swap = {
            BatchesProcessedColumn: _CountColumn(self, self.theme.batch_progress),
            ProcessingSpeedColumn: _SpeedColumn(self, self.theme.processing_speed),
        }
        return [swap.get(type(c), c) for c in columns]

    def _show_steps(self, trainer: L.Trainer, reset: bool = False) -> None:
        if self.progress is None or self.train_progress_bar_id is None:
            return
        if trainer.max_steps is None or trainer.max_steps <= 0:
            return
        self._shown_step = trainer.global_step
        args = {
            "total": trainer.max_steps,
            "completed": trainer.global_step,
            "description": self._get_train_description(trainer.current_epoch),
        }
        if reset:  # no speed sample for the steps done before this process (a resume)
            self.progress.reset(self.train_progress_bar_id, visible=True, **args)
        else:
            self.progress.update(self.train_progress_bar_id, **args)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        if self.is_enabled:
            self._show_steps(trainer, reset=True)
            self.refresh()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.is_disabled:
            return
        if self.train_progress_bar_id is None:  # resumed mid-epoch without an epoch start
            self._initialize_train_progress_bar_id()
            self._show_steps(trainer, reset=True)
        if trainer.global_step == self._shown_step:
            return  # a micro-batch inside a gradient accumulation: nothing new to show
        self._show_steps(trainer)
        self._update_metrics(trainer, pl_module)
        self.refresh()
