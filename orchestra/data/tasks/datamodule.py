"""The DataModule of the fine-tuning tasks, and where their jsonl files come from.

Each task is one file of this package defining a :class:`TaskData` (how to read its records,
build its dataset and collate its batches), registered in :data:`TASKS`. Sampling, resume and
the world-size-independent validation set are :class:`~orchestra.data.datamodule.BatchPlan`'s,
shared with pretraining's TokenDataModule.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import lightning as L
import numpy as np
import torch
from tokenizers import Tokenizer
from torch.utils.data import DataLoader, Dataset

from orchestra.config import ConfigError, TaskConfig, TaskName
from orchestra.data.datamodule import BatchPlan, rank_world
from orchestra.data.errors import DataError
from orchestra.data.tasks.classification import ClassificationTask, class_counts
from orchestra.data.tasks.dpo import DPOTask, KTOTask, RewardTask
from orchestra.data.tasks.grpo import GRPOTask
from orchestra.data.tasks.sft import SFTTask
from orchestra.data.tokenizer import vocab_size_of

if TYPE_CHECKING:  # see sft.py
    from orchestra.data.hf_tokenizer import TokenizerSpec

log = logging.getLogger(__name__)


class TaskData(Protocol):
    """What :class:`TaskDataModule` needs from one task, built from the task config and the base's
    tokens (its chat template and BOS, or None)."""

    label_names: list[str]  # the classes in class-index order, known after read(); empty if none

    def read(self, train_path: Path, val_path: Path | None) -> tuple[list[Any], list[Any] | None]:
        """Both files' records, checked; val is None when there is no val file."""
        ...

    def dataset(
        self, records: list[Any], tokenizer: Tokenizer, eos_id: int, seq_len: int, where: str
    ) -> Dataset[Any]:
        """One split's records, tokenized (deterministic: every rank builds the same rows)."""
        ...

    def collate_fn(self, pad_id: int) -> Callable[[Any], dict[str, torch.Tensor]]:
        """A picklable collate (loader workers receive it)."""
        ...


TASKS: dict[TaskName, Callable[[TaskConfig, TokenizerSpec | None], TaskData]] = {
    TaskName.sft: SFTTask,
    TaskName.classification: ClassificationTask,
    TaskName.dpo: DPOTask,
    TaskName.orpo: DPOTask,
    TaskName.simpo: DPOTask,
    TaskName.kto: KTOTask,
    TaskName.reward: RewardTask,
    TaskName.grpo: GRPOTask,
}

# The bundled example set each task reads when task.train_path is null (preference tasks share dpo's).
EXAMPLE_SETS: dict[TaskName, str] = {
    TaskName.sft: "sft",
    TaskName.classification: "classification",
    TaskName.grpo: "grpo",
    **{name: "dpo" for name in (TaskName.dpo, TaskName.orpo, TaskName.simpo, TaskName.kto, TaskName.reward)},
}


def resolve_task_paths(task: TaskConfig, cache_dir: str | os.PathLike[str]) -> tuple[Path, Path | None]:
    """(train, val) jsonl: the user's files when task.train_path is set, else the bundled examples."""
    name = TaskName(task.name)
    if name == TaskName.pretrain:
        raise ConfigError("task.name: pretrain reads the data group's packed corpus, not task jsonl files")
    if task.train_path is None:
        if task.val_path is not None:
            raise DataError(
                f"task.val_path: set ({task.val_path}) without task.train_path; set both, or neither "
                "to use the bundled examples"
            )
        from orchestra.data.examples import example_paths

        return example_paths(cache_dir, EXAMPLE_SETS[name])
    paths: list[Path | None] = []
    for key, value in (("task.train_path", task.train_path), ("task.val_path", task.val_path)):
        if value is None:
            paths.append(None)
            continue
        path = Path(os.path.expanduser(value))
        if not path.is_file():
            raise DataError(f"{key}: {value} does not exist (relative paths are resolved from {os.getcwd()})")
        paths.append(path)
    assert paths[0] is not None
    return paths[0], paths[1]


def hold_out(n: int, fraction: float, seed: int, where: str) -> tuple[list[int], list[int]]:
    """(train, val) indices, both in file order: a seeded ``fraction`` of n (at least one) for val."""
    n_val = max(1, round(n * fraction))
    if n - n_val < 1:
        raise DataError(
            f"{where}: {n} example(s) cannot be split into train and val; add examples or set task.val_path"
        )
    val = np.random.default_rng(seed).permutation(n)[:n_val]
    mask = np.zeros(n, dtype=bool)
    mask[val] = True
    return np.flatnonzero(~mask).tolist(), np.flatnonzero(mask).tolist()


class TaskDataModule(L.LightningDataModule):
    """Train/val loaders of one fine-tuning task over jsonl files, resumable like pretraining.

    ``tokens`` is a Hugging Face base's :class:`~orchestra.data.hf_tokenizer.TokenizerSpec`: sft and
    dpo render with its chat template (unless task.chat_template is set) and its BOS.

    The records are read and checked at construction (a bad file fails before any model is
    built); tokenization happens once per split on first use, on every rank alike. Sampling,
    resume and the validation batches are the :class:`BatchPlan`'s, as for TokenDataModule, so
    the checkpointed data state has the same form.
    """

    def __init__(
        self,
        task: TaskConfig,
        train_path: str | os.PathLike[str],
        val_path: str | os.PathLike[str] | None,
        tokenizer_json: str,
        eos_id: int,
        seq_len: int,
        micro_batch_size: int,
        global_batch_size: int,
        seed: int,
        max_steps: int,
        val_batches: int,
        loader_workers: int = 0,
        skip_steps: tuple[int, ...] = (),
        tokens: TokenizerSpec | None = None,
        whole_step: bool = False,
    ) -> None:
        super().__init__()
        self.task = task
        self.task_name = TaskName(task.name)
        if self.task_name not in TASKS:
            raise ConfigError(
                f"task.name: TaskDataModule serves {', '.join(t.value for t in TASKS)}; pretrain uses "
                "TokenDataModule"
            )
        self.task_data = TASKS[self.task_name](task, tokens)
        self.train_path, self.val_path = Path(train_path), Path(val_path) if val_path is not None else None
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
        try:
            self.tokenizer = Tokenizer.from_str(tokenizer_json)
        except Exception as err:  # tokenizers raises a bare Exception for parse errors
            raise DataError(f"tokenizer: not a valid Hugging Face tokenizer.json ({err})") from None
        self._eos_id = int(eos_id)
        self._datasets: dict[str, Dataset[Any]] = {}
        self._restored: dict[str, Any] | None = None
        self._records = self._read()

    # ------------------------------------------------------------------ records

    def _read(self) -> dict[str, list[Any]]:
        """Both splits' records, checked; the val split held out of train when there is no val file."""
        train, val = self.task_data.read(self.train_path, self.val_path)
        if val is None:
            keep, held = hold_out(len(train), self.task.val_fraction, self.plan.seed, str(self.train_path))
            train, val = [train[i] for i in keep], [train[i] for i in held]
            log.info(
                "%s: held out %d of %d examples for validation (task.val_fraction=%s)",
                self.train_path,
                len(val),
                len(train) + len(val),
                self.task.val_fraction,
            )
        return {"train": train, "val": val}

    @property
    def label_names(self) -> list[str]:
        """The classes in class-index order (classification; empty for the other tasks)."""
        return self.task_data.label_names

    def num_examples(self, split: str) -> int:
        return len(self._records[split])

    def class_counts(self, split: str) -> list[int]:
        """Examples per class (in label_names order), e.g. for the majority-class baseline."""
        if not self.label_names:
            raise ConfigError(f"class_counts: task {self.task_name.value} has no classes")
        return class_counts(self._records[split], self.label_names)

    # ------------------------------------------------------------------ tokens and loaders

    @property
    def vocab_size(self) -> int:
        return vocab_size_of(self.tokenizer)

    @property
    def eos_id(self) -> int:
        return self._eos_id

    def dataset(self, split: str) -> Dataset[Any]:
        """Tokenized on first use (deterministic, so every rank builds the same rows)."""
        if split not in self._records:
            raise ConfigError(f"split: {split!r} is not one of {sorted(self._records)}")
        if split not in self._datasets:
            where = f"task={self.task_name.value} {split} split"
            self._datasets[split] = self.task_data.dataset(
                self._records[split], self.tokenizer, self.eos_id, self.plan.seq_len, where
            )
        return self._datasets[split]

    @property
    def collate_fn(self) -> Callable[[Any], dict[str, torch.Tensor]]:
        """A picklable collate for the task (loader workers receive it); EOS pads."""
        return self.task_data.collate_fn(self.eos_id)

    def _rank_world(self) -> tuple[int, int]:
        return rank_world(self.trainer)

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank_world()
        dataset = self.dataset("train")
        sampler = self.plan.train_sampler(len(dataset), self.trainer, rank, world, self._restored)
        return self.plan.loader(dataset, sampler, self.collate_fn, state=self.state_dict)

    def val_dataloader(self) -> DataLoader:
        rank, world = self._rank_world()
        dataset = self.dataset("val")
        if self.val_path is None:
            too_small = "raise task.val_fraction (or set task.val_path) or lower trainer.micro_batch_size"
        else:
            too_small = "use a larger task.val_path or lower trainer.micro_batch_size"
        sampler = self.plan.val_sampler(len(dataset), rank, world, too_small)
        return self.plan.loader(dataset, sampler, self.collate_fn)

    def state_dict(self) -> dict[str, Any]:
        return self.plan.state_dict(self.trainer, self._rank_world()[1])

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.plan = self.plan.restored(state_dict)
        self._restored = dict(state_dict)
