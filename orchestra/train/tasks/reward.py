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
from orchestra.train.module import CausalLMModule
from orchestra.train.plan import TaskSpec
from orchestra.train.tasks.sft import task_datamodule

# The one "class" of a reward model: checkpoints record it as labels, so export writes num_labels=1.
REWARD_LABEL = "reward"


class RewardModule(CausalLMModule):
    """Bradley-Terry training of a scalar reward on [2B, T] batches, chosen rows first."""

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

    def task_loss(self, batch: Any) -> torch.Tensor:
        chosen, rejected = self.scores(batch)
        margin = (chosen - rejected).detach()
        self.log("train/reward_margin", margin.mean(), on_step=True, on_epoch=False, sync_dist=True)
        self.log(
            "train/reward_accuracy", (margin > 0).float().mean(), on_step=True, on_epoch=False, sync_dist=True
        )
        return bradley_terry_loss(chosen, rejected)

    def on_validation_epoch_start(self) -> None:
        # loss sum, margin sum, correct pairs, pairs, chosen score sum, rejected score sum
        self._val_sums = torch.zeros(6, dtype=torch.float64, device=self.device)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        chosen, rejected = self.scores(batch)
        n = chosen.numel()
        margin = (chosen - rejected).double()
        self._val_sums += torch.stack(
            [
                bradley_terry_loss(chosen, rejected).double() * n,
                margin.sum(),
                (margin > 0).double().sum(),
                torch.tensor(float(n), dtype=torch.float64, device=self.device),
                chosen.double().sum(),
                rejected.double().sum(),
            ]
        )

    def on_validation_epoch_end(self) -> None:
        s = self.trainer.strategy.reduce(self._val_sums, reduce_op="sum")
        pairs = float(s[3])
        self.log("val/loss", float(s[0]) / pairs, on_step=False, on_epoch=True, prog_bar=True)
        self.log("val/reward_margin", float(s[1]) / pairs, on_step=False, on_epoch=True)
        self.log("val/reward_accuracy", float(s[2]) / pairs, on_step=False, on_epoch=True, prog_bar=True)
        self.log("val/reward_chosen", float(s[4]) / pairs, on_step=False, on_epoch=True)
        self.log("val/reward_rejected", float(s[5]) / pairs, on_step=False, on_epoch=True)


SPEC = TaskSpec(
    name="reward",
    module=RewardModule,
    build_datamodule=task_datamodule,
    lm_head=False,
    rows_per_example=2,
)
