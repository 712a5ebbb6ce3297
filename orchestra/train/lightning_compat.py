"""Where Orchestra adapts Lightning: every workaround in one place, with the version it was read against.

Read against Lightning 2.6.6 (pyproject allows ``lightning>=2.5,<2.7``). Each piece says which
Lightning behaviour it works around, so a newcomer sees the true cost of the framework and an
upgrade knows what to re-read. Pieces that must live inside another class are in strategy.py
and loggers.py, and are listed here:

- ``strategy._AtomicDirectorySave``: FSDP2/DeepSpeed write a checkpoint directory straight into
  its final path; ours writes a temp dir and renames it after a barrier.
- ``loggers._ResumingWriter``: ``ExperimentWriter._check_log_dir_exists`` warns on every resume.
- ``strategy.lightning_precision``: DeepSpeed's precision plugin names.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger

LIGHTNING_READ_AGAINST = "2.6.6"


class LastValidation(Callback):
    """Remembers the step of the newest validation, so the end of a run is validated exactly once.

    Lightning validates on ``val_check_interval`` only; a run whose max_steps is not a multiple
    of it would end without a final validation, and one that is would otherwise be validated twice.
    """

    def __init__(self) -> None:
        self.step = -1

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.step = trainer.global_step


def slurm_plugins() -> list[Any]:
    """Under srun: Lightning's SLURM environment, but never its in-handler requeue.

    Lightning's auto_requeue saves inside the signal handler (a collective at an arbitrary point);
    PreemptionCallback saves at a step boundary and slurm/pretrain.sh requeues instead.
    """
    from lightning.fabric.plugins.environments import SLURMEnvironment

    if not SLURMEnvironment.detect():
        return []
    if os.environ.get("SLURM_PROCID", "0") == "0":
        print(
            f"SLURM job {os.environ.get('SLURM_JOB_ID')}: SLURM_RESTART_COUNT="
            f"{os.environ.get('SLURM_RESTART_COUNT', '0')}",
            flush=True,
        )
    return [SLURMEnvironment(auto_requeue=False)]


def save_final_checkpoint(
    trainer: L.Trainer, checkpointing: ModelCheckpoint, newest: Path | None, last: Path
) -> None:
    """Save the final state when ModelCheckpoint did not (every rank calls this).

    ModelCheckpoint defers the save at the end of a step to a validation that never comes when
    max_steps is not a multiple of val_every_n_steps.
    """
    from orchestra.train.checkpoint.io import checkpoint_step

    if newest is None or checkpoint_step(newest) < trainer.global_step:
        trainer.save_checkpoint(last)
        checkpointing.last_model_path = str(last)


def finish_wandb(trainer: L.Trainer) -> None:
    """Close the W&B run: Lightning leaves it open, and the next job of a sweep would reuse it."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and trainer.is_global_zero:
            logger.experiment.finish()


def realign_loop_progress(checkpoint: dict[str, Any], accumulation: int) -> None:
    """Translate Lightning's restored micro-batch counters to the current gradient accumulation.

    Lightning checkpoints count *micro-batches* (``epoch_loop.batch_progress``) and decides
    when to step the optimizer from ``ready % accumulate_grad_batches``. After a resume at
    another world size (or micro batch size) the accumulation differs, so the saved count
    ``k * old_accumulation`` would put optimizer steps off the sampler's step boundaries.
    Call this from ``LightningModule.on_load_checkpoint(checkpoint)`` -- Lightning runs that hook
    before it restores the loops -- with the run's current accumulation.
    """
    fit_loop = checkpoint.get("loops", {}).get("fit_loop", {})
    progress = fit_loop.get("epoch_loop.batch_progress")
    step = int(checkpoint.get("global_step", 0))
    if not progress or step <= 0:
        return
    # Lightning keys the datamodule state by class name (TokenDataModule, TaskDataModule).
    states = [v for k, v in checkpoint.items() if k.endswith("DataModule") and isinstance(v, dict)]
    saved = next((s["accumulation"] for s in states if s.get("accumulation")), None)
    old = int(saved) if saved else max(1, round(progress["total"]["ready"] / step))
    if old == accumulation:
        return
    for scope in ("total", "current"):
        counters = progress[scope]
        for key, value in counters.items():
            # Keep each counter's offset from the step boundary (completed lags ready by one
            # when the checkpoint was written in on_train_batch_end).
            counters[key] = max(0, step * accumulation + (int(value) - step * old))
