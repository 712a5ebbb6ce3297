"""task=reward: a reward model, a scalar head on the last token trained on preference pairs.

Data: the preference pairs of task=dpo. The loss is Bradley-Terry's -log sigmoid(r_chosen -
r_rejected) (as in Ouyang et al. 2022); validation reports the share of held-out pairs the model
orders right. The model is a one-label sequence classifier: it exports as
``<Family>ForSequenceClassification`` with ``num_labels=1``, which transformers loads and which
scores a row as training did (the last non-padding token, padding = EOS).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from orchestra.model import Transformer
from orchestra.model.heads import SequenceClassifier
from orchestra.train.metrics import bradley_terry_loss
from orchestra.train.plan import TaskSpec
from orchestra.train.tasks.preference import PreferenceModule
from orchestra.train.tasks.sft import task_datamodule

# The one "class" of a reward model: checkpoints record it as labels, so export writes num_labels=1.
REWARD_LABEL = "reward"


class RewardModule(PreferenceModule):
    """Bradley-Terry training of a scalar reward on [2B, T] batches, chosen rows first.

    The pair metrics (margin, accuracy, mean chosen / rejected) are the preference tasks'; there is
    no reference model.
    """

    uses_reference = False

    def _labels(self, datamodule: Any) -> list[str]:
        return [REWARD_LABEL]

    def _add_head(self, decoder: Transformer) -> nn.Module:
        return SequenceClassifier(decoder, 1)

    def _after_method(self, model: nn.Module) -> None:
        # The head is new: it trains under every method, also when the method froze the base.
        assert isinstance(model, SequenceClassifier)
        model.score.requires_grad_(True)

    def scores(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen scores [B], rejected scores [B]) in fp32."""
        rewards = self.net(batch["tokens"], batch["last_index"]).squeeze(-1)
        half = rewards.shape[0] // 2
        return rewards[:half], rewards[half:]

    def preference_loss(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Bradley-Terry over the pairs; the "rewards" logged are the scores themselves."""
        chosen, rejected = self.scores(batch)
        return bradley_terry_loss(chosen, rejected), chosen.detach(), rejected.detach()


SPEC = TaskSpec(
    name="reward",
    module=RewardModule,
    build_datamodule=task_datamodule,
    lm_head=False,
    rows_per_example=2,
)
