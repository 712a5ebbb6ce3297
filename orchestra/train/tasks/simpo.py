"""task=simpo: Simple Preference Optimization (Meng et al. 2024): a reference-free, length-normalised reward.

Data: the preference pairs of task=dpo. The reward of a response is beta times its mean
per-token log-probability; the loss asks the chosen reward to beat the rejected one by the
margin task.simpo_gamma.
"""

from __future__ import annotations

from typing import Any

import torch

from orchestra.config import TrainConfig, require
from orchestra.train.metrics import simpo_loss
from orchestra.train.plan import TaskSpec
from orchestra.train.tasks.preference import PreferenceModule
from orchestra.train.tasks.sft import task_datamodule


def _validate(cfg: TrainConfig) -> None:
    require(cfg.task.beta > 0, "task.beta", f"must be positive, got {cfg.task.beta}")
    require(cfg.task.simpo_gamma >= 0, "task.simpo_gamma", f"must be >= 0, got {cfg.task.simpo_gamma}")


class SimPOModule(PreferenceModule):
    """SimPO: one policy forward over chosen and rejected rows; no reference."""

    uses_reference = False

    def preference_loss(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        _, _, mean_logps = self.mean_logps(batch)
        half = mean_logps.shape[0] // 2
        task = self.cfg.task
        return simpo_loss(mean_logps[:half], mean_logps[half:], task.beta, task.simpo_gamma)


SPEC = TaskSpec(
    name="simpo",
    module=SimPOModule,
    build_datamodule=task_datamodule,
    validate=_validate,
    rows_per_example=2,
)
