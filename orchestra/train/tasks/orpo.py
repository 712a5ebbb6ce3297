"""task=orpo: Odds-Ratio Preference Optimization (Hong et al. 2024): SFT and preference in one loss.

Data: the preference pairs of task=dpo. No reference model: the loss is the chosen responses'
next-token loss plus beta (the paper's lambda) times -log sigmoid of the log odds ratio of the
chosen over the rejected response's length-normalised likelihood.
"""

from __future__ import annotations

from typing import Any

import torch

from orchestra.config import TrainConfig, require
from orchestra.train.metrics import orpo_loss
from orchestra.train.plan import TaskSpec
from orchestra.train.tasks.preference import PreferenceModule
from orchestra.train.tasks.sft import task_datamodule


def _validate(cfg: TrainConfig) -> None:
    require(cfg.task.beta > 0, "task.beta", f"must be positive (ORPO's lambda), got {cfg.task.beta}")


class ORPOModule(PreferenceModule):
    """ORPO: one policy forward over chosen and rejected rows; no reference."""

    uses_reference = False

    def preference_loss(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logps, counts, mean_logps = self.mean_logps(batch)
        half = logps.shape[0] // 2
        # The SFT term: mean next-token loss over every chosen token of the batch.
        chosen_nll = -logps[:half].sum() / counts[:half].sum().clamp(min=1)
        return orpo_loss(mean_logps[:half], mean_logps[half:], chosen_nll, self.cfg.task.beta)


SPEC = TaskSpec(
    name="orpo",
    module=ORPOModule,
    build_datamodule=task_datamodule,
    validate=_validate,
    rows_per_example=2,
)
