"""Lightning DataModule over a prepared dataset, resumable at any world size.

How Lightning 2.6.6 resumes (read in ``trainer/trainer.py:_run`` and
``trainer/connectors/checkpoint_connector.py``):

1. ``_restore_modules_and_callbacks``: ``LightningModule.on_load_checkpoint(checkpoint)``, then
   ``DataModule.load_state_dict``, then callbacks;
2. ``strategy.setup``, then ``restore_training_state`` -> ``restore_loops``: ``trainer.global_step``
   (optimizer progress) and the epoch loop's micro-batch counter come back;
3. ``_run_stage`` -> ``fit_loop.run()`` -> ``setup_data()`` -> ``train_dataloader()``.

So the sampler simply starts at ``trainer.global_step``; the checkpointed ``consumed_samples``
is a cross-check, and the seed / global batch guard refuses a changed data order. Lightning
counts *micro-batches per epoch* and the whole run is one epoch here, which has two
consequences (both tested in tests/data/test_data_datamodule.py):

* ``len(train loader)`` must include the batches counted before the restart, or Lightning ends
  the epoch early and iterates the sampler again from the resume step (replaying data); the
  sampler's ``counted_before`` does this.
* after a change of gradient accumulation (another world size) the restored counter no longer
  sits on a step boundary; :func:`realign_loop_progress`, called from the LightningModule's
  ``on_load_checkpoint``, translates it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from orchestra.data.dataset import (
    GlobalBatchSampler,
    PackedDataset,
    ValBatchSampler,
    check_sampler_state,
    load_manifest,
)

log = logging.getLogger(__name__)


class TokenDataModule(L.LightningDataModule):
    """Train/val loaders of fixed-length windows; the train order is a function of (seed, step)."""

    def __init__(
        self,
        dataset_dir: str | os.PathLike[str],
        seq_len: int,
        micro_batch_size: int,
        global_batch_size: int,
        seed: int,
        max_steps: int,
        val_batches: int,
        loader_workers: int = 1,
    ) -> None:
        super().__init__()
        self.dataset_dir = Path(dataset_dir)
        self._set_batching(
            seq_len, micro_batch_size, global_batch_size, seed, max_steps, val_batches, loader_workers
        )
        self.manifest = load_manifest(self.dataset_dir)  # cheap; vocab_size/eos_id are needed before fit

    def _set_batching(
        self,
        seq_len: int,
        micro_batch_size: int,
        global_batch_size: int,
        seed: int,
        max_steps: int,
        val_batches: int,
        loader_workers: int,
    ) -> None:
        """What the samplers and loaders need; shared with TaskDataModule (orchestra/data/tasks.py)."""
        self.seq_len, self.micro_batch_size, self.global_batch_size = (
            seq_len,
            micro_batch_size,
            global_batch_size,
        )
        self.seed, self.max_steps, self.val_batches, self.loader_workers = (
            seed,
            max_steps,
            val_batches,
            loader_workers,
        )
        self._datasets: dict[str, Any] = {}
        self._restored: dict[str, Any] | None = None

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    @property
    def eos_id(self) -> int:
        return int(self.manifest["eos_id"])

    def dataset(self, split: str) -> PackedDataset:
        """Built once per split, shards verified against the manifest on first use."""
        if split not in self._datasets:
            self._datasets[split] = PackedDataset(self.dataset_dir, split, self.seq_len, verify=True)
        return self._datasets[split]

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (int(trainer.global_rank), int(trainer.world_size)) if trainer is not None else (0, 1)

    def _loader(self, dataset: PackedDataset, batch_sampler: Any, stateful: bool = False) -> DataLoader:
        workers = self.loader_workers
        cls = _ResumableDataLoader if stateful else DataLoader
        loader = cls(
            dataset,
            batch_sampler=batch_sampler,
            num_workers=workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=workers > 0,
        )
        if isinstance(loader, _ResumableDataLoader):
            loader.datamodule = self
        return loader

    def train_sampler(self) -> GlobalBatchSampler:
        """The sampler for this rank, starting at the trainer's restored optimizer step."""
        rank, world = self._rank_world()
        trainer = self.trainer
        start_step = int(trainer.global_step) if trainer is not None else 0
        counted = 0
        if trainer is not None:
            # Lightning's restored within-epoch batch counter (the whole run is one epoch). It is
            # added to the sampler's length so Lightning's epoch ends exactly when the sampler does.
            counted = int(trainer.fit_loop.epoch_loop.batch_progress.current.ready)
        if self._restored is not None:
            consumed = int(self._restored["consumed_samples"])
            if consumed != start_step * self.global_batch_size:
                log.warning(
                    "checkpoint records %d consumed samples but the trainer restored step %d (x %d); "
                    "continuing from the trainer's step",
                    consumed,
                    start_step,
                    self.global_batch_size,
                )
        return GlobalBatchSampler(
            num_samples=len(self.dataset("train")),
            global_batch_size=self.global_batch_size,
            micro_batch_size=self.micro_batch_size,
            rank=rank,
            world_size=world,
            seed=self.seed,
            total_steps=self.max_steps,
            start_step=min(start_step, self.max_steps),
            counted_before=counted,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("train"), self.train_sampler(), stateful=True)

    def val_dataloader(self) -> DataLoader:
        rank, world = self._rank_world()
        dataset = self.dataset("val")
        sampler = ValBatchSampler(len(dataset), self.micro_batch_size, rank, world, self.val_batches)
        if sampler.total_batches != sampler.requested and rank == 0:
            log.warning(
                "validating on %d batches of %d samples, not trainer.val_batches=%d (split size, or "
                "rounded to a multiple of %d ranks)",
                sampler.total_batches,
                self.micro_batch_size,
                sampler.requested,
                world,
            )
        return self._loader(dataset, sampler)

    def accumulation(self) -> int:
        """Micro-batches per optimizer step on each rank at the current world size."""
        _, world = self._rank_world()
        return self.global_batch_size // (self.micro_batch_size * world)

    def state_dict(self) -> dict[str, Any]:
        step = int(self.trainer.global_step) if self.trainer is not None else 0
        return {
            "consumed_samples": step * self.global_batch_size,
            "global_batch_size": self.global_batch_size,
            "seed": self.seed,
            # Lets realign_loop_progress() translate Lightning's batch counters to a new world size.
            "accumulation": self.accumulation(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        check_sampler_state(state_dict, self.seed, self.global_batch_size)
        self._restored = dict(state_dict)


class _ResumableDataLoader(DataLoader):
    """A DataLoader Lightning recognises as resumable (it has state_dict/load_state_dict).

    The position itself is restored through the trainer's global step (see the module
    docstring); this only tells Lightning so -- otherwise it warns on every mid-run resume that
    the loader "is not resumable" -- and re-checks the seed / global batch guard.
    """

    datamodule: TokenDataModule | None = None

    def state_dict(self) -> dict[str, Any]:
        return self.datamodule.state_dict() if self.datamodule is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.datamodule is not None and state_dict:
            check_sampler_state(state_dict, self.datamodule.seed, self.datamodule.global_batch_size)


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
    # Lightning keys the datamodule state by class name: TokenDataModule, or a subclass (TaskDataModule).
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
