"""Evaluation during training and early stopping on its metrics (TrainConfig.eval).

At the end of a validation (every eval.every_n_steps), the model as it is runs the chosen
orchestra-eval tasks over a fixed subset and logs ``eval/<task>/<metric>``, so they reach
metrics.csv, W&B and the report with the validation loss. Every rank evaluates the whole subset
(identical work on every rank: a sharded model's forward is collective, so ranks must not
split the examples unevenly), and logs the same numbers.

Early stopping is Lightning's own EarlyStopping, told to skip the validations at which the
monitored metric was not computed; its outcome goes to ``<run_dir>/early_stopping.json``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping

from orchestra.config import TrainEvalConfig
from orchestra.io import atomic_write_text

log = logging.getLogger(__name__)

EARLY_STOPPING_FILE = "early_stopping.json"


class _WholeSet:
    """A :class:`~orchestra.eval.tasks.Ranks` of one: every rank runs every example."""

    rank, world = 0, 1

    def shard(self, items: Any) -> list[Any]:
        return list(enumerate(items))

    def gather(self, records: list[Any]) -> list[Any]:
        return [r for _, r in sorted(records, key=lambda p: p[0])]


class EvaluationCallback(Callback):
    """Runs eval.tasks at validations, on the unwrapped model, in eval mode and without gradients."""

    def __init__(
        self,
        cfg: TrainEvalConfig,
        tokenizer_json: str,
        eos_ids: tuple[int, ...],
        bos_id: int | None = None,
        chat_template: str | None = None,
    ) -> None:
        from dataclasses import replace

        self.cfg = cfg
        self.options = replace(cfg.options, tasks=list(cfg.tasks), limit=cfg.limit)
        self.tokenizer_json = tokenizer_json
        self.eos_ids, self.bos_id, self.chat_template = eos_ids, bos_id, chat_template
        self._tokenizer: Any = None

    def _due(self, trainer: L.Trainer) -> bool:
        every = self.cfg.every_n_steps
        step = trainer.global_step
        return every == 0 or step % every == 0 or step >= (trainer.max_steps or 0)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not self._due(trainer):
            return
        from tokenizers import Tokenizer

        from orchestra.eval.model import EvalModel, tokenizer_sha256
        from orchestra.eval.tasks import eval_task

        if self._tokenizer is None:
            self._tokenizer = Tokenizer.from_str(self.tokenizer_json)
        net: torch.nn.Module = pl_module.net  # type: ignore[assignment]
        evaluated = EvalModel(
            model=net,
            tokenizer=self._tokenizer,
            eos_ids=self.eos_ids,
            bos_id=self.bos_id,
            add_bos=self.bos_id is not None,
            chat_template=self.chat_template,
            kind="training",
            source=f"step {trainer.global_step}",
            tokenizer_sha256=tokenizer_sha256(self.tokenizer_json),
            # A classifier's label names come with its data (task=classification).
            labels=tuple(getattr(pl_module, "label_names", ())),
        )
        was_training = net.training
        net.eval()
        try:
            with torch.no_grad():
                for name in self.cfg.tasks:
                    result = eval_task(name).run(evaluated, self.options, _WholeSet())  # type: ignore[arg-type]
                    for metric, value in result.metrics.items():
                        pl_module.log(f"eval/{name}/{metric}", float(value), on_step=False, on_epoch=True)
        finally:
            net.train(was_training)


class RunEarlyStopping(EarlyStopping):
    """Lightning's EarlyStopping at validations where its metric exists; writes early_stopping.json."""

    def __init__(self, cfg: TrainEvalConfig, run_dir: Path) -> None:
        assert cfg.early_stopping is not None
        super().__init__(
            monitor=cfg.early_stopping,
            mode=cfg.mode,
            patience=cfg.patience,
            min_delta=cfg.min_delta,
            check_on_train_epoch_end=False,
            strict=True,
        )
        self.run_dir = run_dir
        self.best_step: int | None = None
        self.stopped_step: int | None = None

    def _should_skip_check(self, trainer: L.Trainer) -> bool:
        # An evaluation that was not due at this validation left the metric out: nothing to judge.
        return super()._should_skip_check(trainer) or self.monitor not in trainer.callback_metrics

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        best = self.best_score.clone()
        super().on_validation_end(trainer, pl_module)
        if not torch.equal(best, self.best_score):
            self.best_step = trainer.global_step
        if trainer.should_stop and self.stopped_step is None and self.wait_count >= self.patience:
            self.stopped_step = trainer.global_step
            log.info("early stopping at step %d: %s", trainer.global_step, self.monitor)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "best_step": self.best_step, "stopped_step": self.stopped_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.best_step = state_dict.get("best_step")
        self.stopped_step = state_dict.get("stopped_step")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        best = float(self.best_score)
        record = {
            "monitor": self.monitor,
            "mode": self.mode,
            "patience": self.patience,
            "min_delta": abs(float(self.min_delta)),
            "best": best if abs(best) != float("inf") else None,
            "best_step": self.best_step,
            "stopped_step": self.stopped_step,
        }
        atomic_write_text(self.run_dir / EARLY_STOPPING_FILE, json.dumps(record, indent=2) + "\n")
