"""Gradual unfreezing (Howard & Ruder 2018, ULMFiT) as a Lightning callback.

The top block (with the final norm and the head) trains from the first step; every
``every_n_steps`` one more block below joins, and the input embeddings join with block 0.

Every parameter stays ``requires_grad`` and in the optimizer from the start, and the gradients
of blocks that have not joined yet are dropped (set to None) just before the optimizer step:
AdamW skips a parameter without a gradient entirely (no update, no weight decay, no optimizer
state), so a waiting block stays bit-for-bit unchanged. Toggling ``requires_grad`` instead would
save backward compute but breaks DDP's reducer and FSDP2's sharded groups, which fix the set of
trainable parameters when they are built; DeepSpeed's fused optimizer never sees None
gradients, so config validation refuses finetune=unfreeze there.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from orchestra.model.peft import unfreeze_schedule
from orchestra.train.strategy import decoder_of


class GradualUnfreezing(Callback):
    def __init__(self, n_layers: int, every_n_steps: int) -> None:
        self.n_layers = n_layers
        self.schedule = unfreeze_schedule(n_layers, every_n_steps)

    def waiting_parameters(self, model: nn.Module, step: int) -> list[torch.nn.Parameter]:
        """Parameters that must not change at optimizer step ``step`` (0-based)."""
        decoder = decoder_of(model)
        training = self.schedule(step)
        waiting = [
            p for i, block in enumerate(decoder.layers) if i not in training for p in block.parameters()
        ]
        tied = decoder.cfg.tie_embeddings  # a tied embedding is the head, which always trains
        if 0 not in training and not tied:
            waiting.extend(decoder.tok_embeddings.parameters())
        return waiting

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any
    ) -> None:
        for p in self.waiting_parameters(pl_module.model, trainer.global_step):
            p.grad = None

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx % trainer.accumulate_grad_batches == 0:
            pl_module.log(
                "train/unfrozen_blocks",
                float(len(self.schedule(trainer.global_step))),
                on_step=True,
                on_epoch=False,
            )
