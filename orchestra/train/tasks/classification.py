"""task=classification: a linear head on the last token's hidden state, trained with cross-entropy.

Data: jsonl ``{"text": str, "label": str}``; metrics: accuracy, per-class and macro precision /
recall / F1 from a confusion matrix summed over ranks. The model ends in a classifier, not the
language-model head, so FLOPs have no head term and no sample is generated.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from orchestra.io import atomic_write_text
from orchestra.model import Transformer
from orchestra.model.heads import SequenceClassifier
from orchestra.train.metrics import classification_metrics
from orchestra.train.module import CausalLMModule
from orchestra.train.plan import RunPlan, TaskSpec
from orchestra.train.tasks.sft import task_datamodule


class ClassificationModule(CausalLMModule):
    """Sequence classification: cross-entropy of a linear head on the last token's hidden state.

    Validation accumulates a confusion matrix on every rank, sums it over ranks, and derives
    accuracy, per-class and macro precision / recall / F1 from it (exact at any world size);
    the confusion matrix of the newest validation is written to <run_dir>/classification.json.
    """

    def __init__(self, plan: RunPlan, datamodule: Any = None) -> None:
        self.last_report: dict[str, Any] = {}
        super().__init__(plan, datamodule)

    def _labels(self, datamodule: Any) -> list[str]:
        labels = list(datamodule.label_names)
        if len(labels) < 2:
            raise ValueError(f"task=classification needs at least 2 labels, got {labels}")
        return labels

    def _add_head(self, decoder: Transformer) -> nn.Module:
        return SequenceClassifier(decoder, len(self.label_names))

    def _after_method(self, model: nn.Module) -> None:
        # The head is new: it trains under every method, also when the method froze the base.
        assert isinstance(model, SequenceClassifier)
        model.score.requires_grad_(True)

    def _logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits: torch.Tensor = self.net(batch["tokens"], batch["last_index"])
        return logits

    def task_loss(self, batch: Any) -> torch.Tensor:
        return F.cross_entropy(self._logits(batch), batch["labels"])

    def on_validation_epoch_start(self) -> None:
        n = len(self.label_names)
        self._confusion = torch.zeros(n, n, dtype=torch.long, device=self.device)
        self._val_sums = torch.zeros(2, dtype=torch.float64, device=self.device)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        logits = self._logits(batch)
        labels = batch["labels"]
        loss = F.cross_entropy(logits, labels, reduction="sum")
        self._val_sums += torch.stack(
            [loss.double(), torch.tensor(float(labels.numel()), device=self.device, dtype=torch.float64)]
        )
        n = len(self.label_names)
        self._confusion += torch.bincount(labels * n + logits.argmax(-1), minlength=n * n).view(n, n)

    def on_validation_epoch_end(self) -> None:
        sums = self.trainer.strategy.reduce(self._val_sums, reduce_op="sum")
        confusion = self.trainer.strategy.reduce(self._confusion, reduce_op="sum").long().cpu()
        n = len(self.label_names)
        # Every (true, predicted) pair back from the counts: the metrics depend on counts only.
        pairs = torch.arange(n * n).repeat_interleave(confusion.flatten())
        target, preds = pairs // n, pairs % n
        metrics, matrix = classification_metrics(preds, target, self.label_names)
        val_loss = float(sums[0] / sums[1])
        self.log("val/loss", val_loss, on_step=False, on_epoch=True, prog_bar=True)
        for key, value in metrics.items():
            self.log(f"val/{key}", value, on_step=False, on_epoch=True, prog_bar=key == "accuracy")
        support = confusion.sum(1)
        majority = float(support.max() / support.sum()) if support.sum() > 0 else float("nan")
        self.log("val/majority_baseline", majority, on_step=False, on_epoch=True)
        self.last_report = {
            "step": int(self.global_step),
            "labels": self.label_names,
            "loss": val_loss,
            "majority_baseline": majority,
            "support": support.tolist(),
            "confusion_matrix": matrix,
            **metrics,
        }
        if self.trainer.is_global_zero and self.cfg.run_dir:
            path = Path(self.cfg.run_dir) / "classification.json"
            atomic_write_text(path, json.dumps(self.last_report, indent=2) + "\n")


SPEC = TaskSpec(
    name="classification",
    module=ClassificationModule,
    build_datamodule=task_datamodule,
    lm_head=False,
)
