"""What the preference tasks share (dpo, kto, orpo, simpo): sequence log-probabilities, the
frozen reference, the reward metrics.

Each task file defines only its loss over the batch's rows (:meth:`PreferenceModule.preference_loss`)
and whether it needs a reference model. The data are the preference pairs of
orchestra/data/tasks/dpo.py, rendered through the sft chat template.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from orchestra.config import StrategyName, TrainConfig, require
from orchestra.data.tasks.formats import IGNORE_INDEX
from orchestra.model import build_model
from orchestra.train.finetune import peft_disabled
from orchestra.train.methods import method_spec
from orchestra.train.module import CausalLMModule
from orchestra.train.strategy import parallelize


def validate_reference(cfg: TrainConfig) -> None:
    """Rules of a task whose reference is the base model (dpo, kto)."""
    require(cfg.task.beta > 0, "task.beta", f"must be positive, got {cfg.task.beta}")
    method, strategy = method_spec(cfg.finetune.method), cfg.strategy.name
    if not method.frozen_base:
        # A full-weight policy needs a second, frozen copy as reference; ZeRO-3 would have to
        # partition it in its own engine.
        require(
            strategy not in (StrategyName.deepspeed_zero3, StrategyName.deepspeed_zero3_offload),
            "strategy",
            f"task={cfg.task.name.value} with finetune={method.name} keeps a frozen reference copy, which "
            "ZeRO-3 cannot partition here; use strategy=fsdp or deepspeed_zero2, or finetune=lora "
            "(whose reference is the base with the adapters switched off)",
        )


class PreferenceModule(CausalLMModule):
    """A policy trained on (prompt, chosen, rejected) rows: [2B, T], chosen rows first.

    With ``uses_reference`` the reference is the base model: for LoRA / adapters the same network
    with the PEFT modules switched off (no second copy in memory), for full-weight methods a
    frozen copy built and sharded like the policy (kept outside the module tree, so it is never
    checkpointed). Rewards are logged as each task defines them (an implicit reward of DPO and KTO,
    the scaled mean log-likelihood of ORPO and SimPO); accuracy is the share of pairs whose chosen
    reward is the larger.
    """

    uses_reference: ClassVar[bool] = True

    @staticmethod
    def sequence_logps(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's summed log-probability of its response tokens [R], and their count [R]."""
        # per_sequence gives each row's summed NLL over its response tokens.
        logps = -model(batch["tokens"], batch["labels"], per_sequence=True)
        return logps, (batch["labels"] != IGNORE_INDEX).sum(-1)

    def _after_base(self, weights: dict[str, torch.Tensor], mesh: Any) -> None:
        if not self.uses_reference or self.method.frozen_base:
            return  # no reference, or the base with the method switched off (peft_disabled)
        # A full-weight policy needs a frozen copy of the base, built and sharded like it.
        reference = build_model(self.cfg.model, self.vocab_size, init=False)
        reference.load_state_dict(weights, strict=True)
        reference.requires_grad_(False).eval()
        self._frozen_reference.append(parallelize(reference, self.cfg.strategy, self.precision_name, mesh))

    def on_fit_start(self) -> None:
        # Lightning moved the policy; the reference is outside the module tree, so move it too
        # (a sharded one already lives on its mesh's devices).
        for reference in self._frozen_reference:
            if not isinstance(next(reference.parameters()), DTensor):
                reference.to(self.device)

    @contextmanager
    def reference(self) -> Iterator[nn.Module]:
        """The reference model, without gradient: the frozen copy, or the policy with its method off."""
        with torch.no_grad():
            if self._frozen_reference:
                yield self._frozen_reference[0]
            else:
                with peft_disabled(self.net):
                    yield self.net

    def reference_logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The reference model's summed log-probabilities of the rows [R], without gradient."""
        with self.reference() as model:
            return self.sequence_logps(model, batch)[0]

    def mean_logps(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The policy's (summed log-probabilities [2B], response tokens [2B], their mean per token [2B])."""
        logps, counts = self.sequence_logps(self.net, batch)
        return logps, counts, logps / counts.clamp(min=1)

    def preference_loss(
        self, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, chosen rewards [B], rejected rewards [B]) of one batch; rewards detached."""
        raise NotImplementedError

    def task_loss(self, batch: Any) -> torch.Tensor:
        loss, chosen, rejected = self.preference_loss(batch)
        margin = chosen - rejected
        self.log("train/reward_margin", margin.mean(), on_step=True, on_epoch=False, sync_dist=True)
        self.log(
            "train/reward_accuracy", (margin > 0).float().mean(), on_step=True, on_epoch=False, sync_dist=True
        )
        return loss

    def on_validation_epoch_start(self) -> None:
        # loss sum, margin sum, correct pairs, pairs, chosen reward sum, rejected reward sum
        self._val_sums = torch.zeros(6, dtype=torch.float64, device=self.device)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        loss, chosen, rejected = self.preference_loss(batch)
        n = chosen.numel()
        margin = (chosen - rejected).double()
        self._val_sums += torch.stack(
            [
                loss.detach().double() * n,
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
