"""The plan of one training run: every decision made before a Lightning object exists.

:func:`orchestra.train.run.plan_run` turns a validated config into a frozen :class:`RunPlan`
(which base, which shape, which rows, which tokenizer, where to resume, which precision, how
many ranks and accumulation steps); the rest of the run only reads it. The config itself is
never changed: a base model's shape and tokenizer produce a new, re-validated config in
:attr:`RunPlan.config`, and the caller's object stays as it was.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestra.config import ModelConfig, TrainConfig
from orchestra.train.checkpoint.meta import BaseRef, LastRow
from orchestra.train.finetune import BaseModel
from orchestra.train.methods.spec import MethodSpec, no_rules


@dataclass(frozen=True)
class TaskSpec:
    """What one task is: its data, its LightningModule and its cost terms.

    Every task lives in its own file under orchestra/train/tasks/ and exports ``SPEC``.
    """

    name: str
    # The LightningModule class; it is built as ``module(plan, datamodule)``.
    module: type[Any]
    # The train/val data of this task for a plan.
    build_datamodule: Callable[[RunPlan], Any]
    # False only for pretraining: every other task adapts a pretrained model.
    needs_base: bool = True
    # Reads the data group's packed corpus: every row is full, so tokens per step is known.
    full_rows: bool = False
    # The model ends in the language-model head: counted in FLOPs, and a sample is generated.
    lm_head: bool = True
    # Its loss is the decoder's own next-token loss over every position, which strategy.tp splits
    # over the vocabulary (loss parallel) and strategy.cp over the sequence; a task with its own
    # head or a second model (classification, DPO) is not split.
    model_parallel: bool = False
    # The task's own config rules and its combinations with method and strategy.
    validate: Callable[[TrainConfig], None] = no_rules
    # Rows of one example in a batch: 2 for a preference pair, 3 for KTO (plus a mismatched row).
    rows_per_example: int = 1
    # A frozen reference model runs a forward over the rows (DPO, KTO): sizing counts it.
    reference: bool = False


@dataclass(frozen=True)
class RunPlan:
    """Everything a run decided from its config (see the module docstring)."""

    # The effective config: the base's shape and tokenizer applied, validated as a whole.
    config: TrainConfig
    run_dir: Path
    method: MethodSpec
    task: TaskSpec
    vocab_size: int
    # Tokens per training row (the base keeps its full context; a soft prompt takes its share).
    seq_len: int
    tokenizer_json: str
    # The EOS fine-tuning data ends with (an HF base: the one its chat template closes turns with).
    eos_id: int
    precision: str
    world_size: int
    accumulation: int
    # pretrain: the prepared dataset; fine-tuning tasks read their jsonl files.
    dataset_dir: Path | None = None
    base: BaseModel | None = field(default=None, repr=False)
    resume_path: Path | None = None
    resume_step: int | None = None
    # The metrics row a resumed checkpoint carries for the CSV logger.
    last_row: LastRow | None = None
    # Data steps never trained on: data.skip_steps, and the loss guard's rollbacks in this run dir.
    skip_steps: tuple[int, ...] = ()
    # Every id generation stops on, eos_id first (an HF base's eos ids: Llama 3.x Instruct has three);
    # checkpoints record them. Empty = (eos_id,).
    eos_ids: tuple[int, ...] = ()

    @property
    def model(self) -> ModelConfig:
        return self.config.model

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """:attr:`eos_ids`, never empty: eos_id first."""
        return self.eos_ids or (self.eos_id,)

    @property
    def base_reference(self) -> BaseRef | None:
        return self.base.reference if self.base is not None else None

    @property
    def tokens_per_step(self) -> int | None:
        """Tokens of one optimizer step when every row is full; None for padded fine-tuning batches."""
        return self.config.trainer.global_batch_size * self.seq_len if self.task.full_rows else None

    def batch_args(self) -> dict[str, Any]:
        """The batching arguments every data module takes."""
        t = self.config.trainer
        return {
            "seq_len": self.seq_len,
            "micro_batch_size": t.micro_batch_size,
            "global_batch_size": t.global_batch_size,
            "seed": self.config.seed,
            "max_steps": t.max_steps,
            "val_batches": t.val_batches,
            "loader_workers": self.config.data.loader_workers,
            "skip_steps": self.skip_steps,
            "whole_step": self.config.strategy.pp > 1,
        }
