"""task=kto: Kahneman-Tversky Optimization (Ethayarajh et al. 2024) against a frozen reference.

Data: the preference pairs of task=dpo; each chosen response is a desirable example and each
rejected one an undesirable example (TRL's conversion of paired data). The reference point z0,
an estimate of KL(policy || reference), comes from mismatched pairs (each prompt with the next
example's chosen response), taken without gradient and averaged over the data-parallel ranks.
"""

from __future__ import annotations

from typing import Any

import torch

from orchestra.config import TrainConfig, require
from orchestra.train.metrics import kto_loss
from orchestra.train.plan import TaskSpec
from orchestra.train.tasks.preference import PreferenceModule, validate_reference
from orchestra.train.tasks.sft import task_datamodule


def _validate(cfg: TrainConfig) -> None:
    validate_reference(cfg)
    for key in ("kto_desirable_weight", "kto_undesirable_weight"):
        value = getattr(cfg.task, key)
        require(value > 0, f"task.{key}", f"must be positive, got {value}")


class KTOModule(PreferenceModule):
    """KTO over [3B, T] batches: chosen rows, rejected rows, then the mismatched rows."""

    def preference_loss(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b = batch["tokens"].shape[0] // 3
        reference = self.reference_logps(batch)
        pairs = {key: batch[key][: 2 * b] for key in ("tokens", "labels")}
        policy, _ = self.sequence_logps(self.net, pairs)
        with torch.no_grad():
            mismatched = {key: batch[key][2 * b :] for key in ("tokens", "labels")}
            policy_kl, _ = self.sequence_logps(self.net, mismatched)
            kl = (policy_kl - reference[2 * b :]).mean()
            # One reference point for the whole global batch, as TRL gathers it over processes.
            kl = self.trainer.strategy.reduce(kl, reduce_op="mean")
        task = self.cfg.task
        return kto_loss(
            policy[:b],
            policy[b:],
            reference[:b],
            reference[b : 2 * b],
            kl,
            task.beta,
            task.kto_desirable_weight,
            task.kto_undesirable_weight,
        )


SPEC = TaskSpec(
    name="kto",
    module=KTOModule,
    build_datamodule=task_datamodule,
    validate=_validate,
    rows_per_example=3,
    reference=True,
)
