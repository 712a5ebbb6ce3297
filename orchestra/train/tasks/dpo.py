"""task=dpo: Direct Preference Optimization (Rafailov et al. 2023) against a frozen reference.

Data: jsonl ``{"prompt": str, "chosen": str, "rejected": str}``, each pair rendered through the
SFT chat template.
"""

from __future__ import annotations

from typing import Any

import torch

from orchestra.train.metrics import dpo_loss
from orchestra.train.plan import TaskSpec
from orchestra.train.tasks.preference import PreferenceModule, validate_reference
from orchestra.train.tasks.sft import task_datamodule


class DPOModule(PreferenceModule):
    """DPO: -log sigmoid of the chosen minus the rejected implicit reward, beta * log(pi / pi_ref)."""

    def preference_loss(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        reference = self.reference_logps(batch)
        policy, _ = self.sequence_logps(self.net, batch)
        half = policy.shape[0] // 2
        return dpo_loss(policy[:half], policy[half:], reference[:half], reference[half:], self.cfg.task.beta)


SPEC = TaskSpec(
    name="dpo",
    module=DPOModule,
    build_datamodule=task_datamodule,
    validate=validate_reference,
    rows_per_example=2,
    reference=True,
)
