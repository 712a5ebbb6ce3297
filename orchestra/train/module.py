"""The LightningModule for causal-LM pretraining.

The module owns the training-step logic only. The model comes from orchestra.model and knows
nothing of Lightning; parallelism, precision and checkpoint I/O are the Trainer's business.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch

from orchestra.config import TrainConfig, to_plain
from orchestra.data.datamodule import realign_loop_progress
from orchestra.model import Transformer
from orchestra.train.optim import build_optimizer, build_scheduler


class CausalLMModule(L.LightningModule):
    def __init__(self, cfg: TrainConfig, vocab_size: int, tokenizer_json: str = "") -> None:
        super().__init__()
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.tokenizer_json = tokenizer_json
        # Plain builtins only, so checkpoints load with weights_only=True.
        self.save_hyperparameters({"config": to_plain(cfg), "vocab_size": vocab_size}, logger=False)
        self.model: Transformer | None = None

    def configure_model(self) -> None:
        """Build the model here so sharding strategies can construct it where they need it."""
        if self.model is not None:
            return
        self.model = Transformer(self.cfg.model, self.vocab_size)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        inputs, labels = batch
        loss = self.model(inputs, labels)
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Log the lr of each parameter group and the gradient norm before clipping."""
        if self.global_step % self.cfg.trainer.log_every_n_steps != 0:
            return
        for i, group in enumerate(optimizer.param_groups):
            self.log(f"train/lr_{group.get('name', i)}", group["lr"], on_step=True, on_epoch=False)
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if grads:
            self.log("train/grad_norm", torch.nn.utils.get_total_norm(grads), on_step=True, on_epoch=False)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        inputs, labels = batch
        loss = self.model(inputs, labels)
        self.log("val/loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True,
                 batch_size=inputs.shape[0])

    def on_validation_epoch_end(self) -> None:
        val_loss = self.trainer.callback_metrics.get("val/loss")
        if val_loss is not None:
            self.log("val/ppl", math.exp(min(float(val_loss), 50.0)), on_step=False, on_epoch=True)

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = build_optimizer(self.model, self.cfg.optim)
        scheduler = build_scheduler(optimizer, self.cfg.scheduler, self.cfg.trainer.max_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Lightning counts micro-batches; after a resume with another accumulation (another world
        # size) its counters must be rescaled so optimizer steps stay on the sampler's boundaries.
        realign_loop_progress(checkpoint, self.trainer.accumulate_grad_batches)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Everything `orchestra-generate` and export need, so a checkpoint stands on its own.
        checkpoint["orchestra"] = {
            "format": 1,
            "model_config": to_plain(self.cfg.model),
            "vocab_size": self.vocab_size,
            "tokenizer_json": self.tokenizer_json,
        }
