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
  sits on a step boundary; :func:`orchestra.train.lightning_compat.realign_loop_progress`, called from the LightningModule's
  ``on_load_checkpoint``, translates it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from orchestra.data.dataset import (
    GlobalBatchSampler,
    PackedDataset,
    ValBatchSampler,
    check_sampler_state,
    load_manifest,
)
from orchestra.data.errors import DataError

log = logging.getLogger(__name__)
# How DataLoader workers start (data.loader_workers > 0): a fresh server process forks them, so
# they never inherit the locks of threads running in the training process.
WORKER_START_METHOD = "forkserver"


def rank_world(trainer: L.Trainer | None) -> tuple[int, int]:
    """(data-parallel rank, data-parallel size) of the attached trainer; (0, 1) before one is attached.

    The strategy says which ranks read the same batches (Lightning's distributed_sampler_kwargs):
    under tensor parallelism the ranks of one group share theirs, so only the data-parallel
    dimension of the device mesh splits the data. Strategies without one use every rank.
    """
    if trainer is None:
        return (0, 1)
    kwargs = sampler_kwargs(trainer)
    if kwargs:
        return (int(kwargs["rank"]), int(kwargs["num_replicas"]))
    return (int(trainer.global_rank), int(trainer.world_size))


def sampler_kwargs(trainer: L.Trainer) -> dict[str, int] | None:
    """The strategy's data-parallel ``rank``/``num_replicas``; None where it splits over every rank."""
    try:
        kwargs = trainer.strategy.distributed_sampler_kwargs  # type: ignore[attr-defined]
    except (AttributeError, AssertionError):  # single device, or a mesh not built yet
        return None
    return dict(kwargs) if kwargs else None


@dataclass(frozen=True)
class BatchPlan:
    """How a data module cuts its dataset into batches: sampling, resume state and loaders.

    Shared by composition between :class:`TokenDataModule` and the fine-tuning
    ``TaskDataModule``: they differ in where samples come from, not in how they are ordered,
    sharded over ranks or resumed, which all lives here.
    """

    seq_len: int
    micro_batch_size: int
    global_batch_size: int
    seed: int
    max_steps: int
    val_batches: int
    loader_workers: int = 0
    # Data steps never trained on (GlobalBatchSampler); a checkpoint's own list is added on resume.
    skip_steps: tuple[int, ...] = ()
    # Training batches of a rank's whole share of each step (pipeline parallelism, whose schedule
    # cuts them into micro-batches); validation batches stay micro_batch_size rows.
    whole_step: bool = False

    def accumulation(self, world_size: int) -> int:
        """Training batches per optimizer step on each rank at ``world_size``."""
        return self.global_batch_size // (self.train_rows(world_size) * world_size)

    def train_rows(self, world_size: int) -> int:
        """Rows of one training batch: a micro-batch, or with ``whole_step`` a rank's whole step."""
        return self.global_batch_size // world_size if self.whole_step else self.micro_batch_size

    def train_sampler(
        self,
        num_samples: int,
        trainer: L.Trainer | None,
        rank: int,
        world_size: int,
        restored: dict[str, Any] | None,
    ) -> GlobalBatchSampler:
        """The sampler for this rank, starting at the trainer's restored optimizer step."""
        start_step = int(trainer.global_step) if trainer is not None else 0
        counted = 0
        if trainer is not None:
            # Lightning's restored within-epoch batch counter (the whole run is one epoch). It is
            # added to the sampler's length so Lightning's epoch ends exactly when the sampler does.
            counted = int(trainer.fit_loop.epoch_loop.batch_progress.current.ready)
        if restored is not None:
            consumed = int(restored["consumed_samples"])
            if consumed != start_step * self.global_batch_size:
                log.warning(
                    "checkpoint records %d consumed samples but the trainer restored step %d (x %d); "
                    "continuing from the trainer's step",
                    consumed,
                    start_step,
                    self.global_batch_size,
                )
        return GlobalBatchSampler(
            num_samples=num_samples,
            global_batch_size=self.global_batch_size,
            micro_batch_size=self.train_rows(world_size),
            rank=rank,
            world_size=world_size,
            seed=self.seed,
            total_steps=self.max_steps,
            start_step=min(start_step, self.max_steps),
            counted_before=counted,
            skip_steps=self.skip_steps,
        )

    def val_sampler(self, num_samples: int, rank: int, world_size: int, too_small: str) -> ValBatchSampler:
        """The world-size-independent validation batches; ``too_small`` says what to change if none fit."""
        try:
            sampler = ValBatchSampler(num_samples, self.micro_batch_size, rank, world_size, self.val_batches)
        except DataError as err:
            raise DataError(f"{err}; {too_small}") from None
        if sampler.total_batches != sampler.requested and rank == 0:
            log.warning(
                "validating on %d batches of %d samples, not trainer.val_batches=%d (split size, or "
                "rounded to a multiple of %d ranks)",
                sampler.total_batches,
                self.micro_batch_size,
                sampler.requested,
                world_size,
            )
        return sampler

    def loader(
        self,
        dataset: Dataset[Any],
        batch_sampler: Any,
        collate_fn: Callable[[Any], Any] | None = None,
        state: Callable[[], dict[str, Any]] | None = None,
    ) -> DataLoader:
        """A DataLoader over ``batch_sampler``; with ``state`` (the data module's state_dict) a resumable one."""
        workers = self.loader_workers
        cls = _ResumableDataLoader if state is not None else DataLoader
        loader = cls(
            dataset,
            batch_sampler=batch_sampler,
            collate_fn=collate_fn,
            num_workers=workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=workers > 0,
            # Not fork: a worker forked after the process group (or CUDA, or a logger) started
            # threads can deadlock before it runs, and then the other ranks wait in a collective.
            multiprocessing_context=WORKER_START_METHOD if workers > 0 else None,
        )
        if isinstance(loader, _ResumableDataLoader):
            loader.plan, loader.state = self, state
        return loader

    def state_dict(self, trainer: L.Trainer | None, world_size: int) -> dict[str, Any]:
        """The data position of a checkpoint: samples consumed by the trainer's step, and its guard."""
        step = int(trainer.global_step) if trainer is not None else 0
        return {
            "consumed_samples": step * self.global_batch_size,
            "global_batch_size": self.global_batch_size,
            "seed": self.seed,
            # Lets lightning_compat.realign_loop_progress() translate Lightning's batch counters to a new world size.
            "accumulation": self.accumulation(world_size),
            "skip_steps": list(self.skip_steps),
        }

    def check_state(self, state: dict[str, Any]) -> None:
        """Refuse a checkpoint's data position written under another seed or global batch."""
        check_sampler_state(state, self.seed, self.global_batch_size)

    def restored(self, state: dict[str, Any]) -> BatchPlan:
        """This plan after loading a checkpoint's data state: its skipped data steps added."""
        self.check_state(state)
        skips = set(self.skip_steps) | {int(s) for s in state.get("skip_steps", ())}
        return dataclasses.replace(self, skip_steps=tuple(sorted(skips)))


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
        loader_workers: int = 0,
        skip_steps: tuple[int, ...] = (),
        whole_step: bool = False,
    ) -> None:
        super().__init__()
        self.dataset_dir = Path(dataset_dir)
        self.plan = BatchPlan(
            seq_len,
            micro_batch_size,
            global_batch_size,
            seed,
            max_steps,
            val_batches,
            loader_workers,
            tuple(skip_steps),
            whole_step,
        )
        self.manifest = load_manifest(self.dataset_dir)  # cheap; vocab_size/eos_id are needed before fit
        self._datasets: dict[str, PackedDataset] = {}
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
            self._datasets[split] = PackedDataset(self.dataset_dir, split, self.plan.seq_len, verify=True)
        return self._datasets[split]

    def _rank_world(self) -> tuple[int, int]:
        return rank_world(self.trainer)

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank_world()
        dataset = self.dataset("train")
        sampler = self.plan.train_sampler(len(dataset), self.trainer, rank, world, self._restored)
        return self.plan.loader(dataset, sampler, state=self.state_dict)

    def val_dataloader(self) -> DataLoader:
        rank, world = self._rank_world()
        dataset = self.dataset("val")
        too_small = "raise data.val_fraction or lower trainer.micro_batch_size"
        return self.plan.loader(dataset, self.plan.val_sampler(len(dataset), rank, world, too_small))

    def state_dict(self) -> dict[str, Any]:
        return self.plan.state_dict(self.trainer, self._rank_world()[1])

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.plan = self.plan.restored(state_dict)
        self._restored = dict(state_dict)


class _ResumableDataLoader(DataLoader):
    """A DataLoader Lightning recognises as resumable (it has state_dict/load_state_dict).

    The position itself is restored through the trainer's global step (see the module
    docstring); this only tells Lightning so -- otherwise it warns on every mid-run resume that
    the loader "is not resumable" -- and re-checks the seed / global batch guard.
    """

    plan: BatchPlan | None = None
    state: Callable[[], dict[str, Any]] | None = None

    def state_dict(self) -> dict[str, Any]:
        return self.state() if self.state is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.plan is not None and state_dict:
            self.plan.check_state(state_dict)
