"""The LightningModule for causal-LM pretraining.

The module owns the training-step logic only. The model comes from orchestra.model and knows
nothing of Lightning; parallelism, precision and checkpoint I/O are the Trainer's business.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from torch.distributed.tensor import DTensor

from orchestra.config import FinetuneMethod, StrategyName, TrainConfig, to_plain
from orchestra.data.datamodule import realign_loop_progress
from orchestra.model import Transformer
from orchestra.model.peft import L2SP, layerwise_lr_groups
from orchestra.train.finetune import PEFT_METHODS, BaseModel, apply_method, peft_metadata
from orchestra.train.optim import build_optimizer, build_scheduler
from orchestra.train.strategy import parallelize


class CausalLMModule(L.LightningModule):
    def __init__(self, cfg: TrainConfig, vocab_size: int, tokenizer_json: str = "",
                 precision: str = "32-true", base: BaseModel | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.method = FinetuneMethod(cfg.finetune.method)
        self.base = base
        self.base_reference = base.reference if base is not None else None
        self.l2sp: L2SP | None = None
        if self.method in PEFT_METHODS:
            # PEFT checkpoints hold the trainable tensors only; the frozen rest is rebuilt from the base.
            self.strict_loading = False
        self.vocab_size = vocab_size
        self.tokenizer_json = tokenizer_json
        self.precision_name = precision
        # Plain builtins only, so checkpoints load with weights_only=True.
        self.save_hyperparameters({"config": to_plain(cfg), "vocab_size": vocab_size}, logger=False)
        self.model: Transformer | None = None
        self._step_losses: list[torch.Tensor] = []
        if cfg.strategy.name.is_deepspeed:
            # Built now, not in configure_model: Lightning runs that hook under DeepSpeed's
            # zero.Init for ZeRO-3, which partitions parameters before our init scheme could run.
            self.model = self._build_model()

    def configure_model(self) -> None:
        """Build the model here so FSDP2 can shard it on the device mesh Lightning created."""
        if self.model is not None:
            return
        self.model = self._build_model()

    def _build_model(self) -> Transformer:
        model = Transformer(self.cfg.model, self.vocab_size)
        if self.base is not None:
            # Base weights go in before the method wraps layers and before sharding, so FSDP
            # shards the pretrained weights; the copy is dropped once loaded.
            model.load_state_dict(self.base.state_dict, strict=True)
            self.base = None
            apply_method(model, self.cfg.finetune)
        mesh = self.device_mesh if self.cfg.strategy.name == StrategyName.fsdp else None
        model = parallelize(model, self.cfg.strategy, self.precision_name, mesh)
        if self.cfg.finetune.l2sp > 0:
            # Reference taken now: pretrained values (a resume loads its state afterwards), sharded like w.
            self.l2sp = L2SP(model, self.cfg.finetune.l2sp)
        return model

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        inputs, labels = batch
        loss = self.model(inputs, labels)
        self._step_losses.append(loss.detach())
        if self.l2sp is not None:
            penalty = self._l2sp_penalty()
            self.log("train/l2sp", penalty.detach(), on_step=True, on_epoch=False)
            return loss + penalty
        return loss

    def _l2sp_penalty(self) -> torch.Tensor:
        assert self.l2sp is not None
        ref = next(iter(self.l2sp.reference.values()))
        if ref.device != self.device:  # the reference was taken before Lightning moved the model
            self.l2sp.to(self.device)
        return self.l2sp.penalty(self.model)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Log the loss of the whole global batch once per optimizer step.

        The mean over this rank's accumulated micro-batches, averaged over ranks, is the same
        number whatever the split of the global batch, so runs at different world sizes compare.
        """
        if (batch_idx + 1) % self.trainer.accumulate_grad_batches != 0:
            return
        loss = torch.stack(self._step_losses).mean()
        self._step_losses.clear()
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True, sync_dist=True)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Log the lr of each parameter group and the gradient norm before clipping."""
        # global_step counts steps before this one; Lightning writes rows where (step + 1) % n == 0.
        if (self.global_step + 1) % self.cfg.trainer.log_every_n_steps != 0:
            return
        for i, group in enumerate(optimizer.param_groups):
            self.log(f"train/lr_{group.get('name', i)}", group["lr"], on_step=True, on_epoch=False)
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if grads:
            norm = torch.nn.utils.get_total_norm(grads)
            if isinstance(norm, DTensor):  # FSDP2: each rank holds a shard of the norm's terms
                norm = norm.full_tensor()
            self.log("train/grad_norm", norm, on_step=True, on_epoch=False)

    def on_validation_epoch_start(self) -> None:
        self._val_sums = torch.zeros(2, dtype=torch.float64, device=self.device)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        inputs, labels = batch
        loss = self.model(inputs, labels)
        tokens = (labels != -100).sum()
        self._val_sums += torch.stack([loss.double() * tokens, tokens.double()])

    def on_validation_epoch_end(self) -> None:
        """Token-weighted mean over all ranks' batches: exact whatever the number of ranks."""
        sums = self.trainer.strategy.reduce(self._val_sums, reduce_op="sum")
        val_loss = float(sums[0] / sums[1])
        self.log("val/loss", val_loss, on_step=False, on_epoch=True, prog_bar=True)
        self.log("val/ppl", math.exp(min(val_loss, 50.0)), on_step=False, on_epoch=True)

    def configure_optimizers(self) -> dict[str, Any]:
        offload = self.cfg.strategy.name == StrategyName.deepspeed_zero3_offload
        groups = None
        if self.cfg.finetune.layer_lr_decay < 1.0:
            groups = layerwise_lr_groups(self.model, self.cfg.optim.lr, self.cfg.finetune.layer_lr_decay,
                                         self.cfg.optim.weight_decay)
        optimizer = build_optimizer(self.model, self.cfg.optim, cpu_offload=offload, groups=groups)
        scheduler = build_scheduler(optimizer, self.cfg.scheduler, self.cfg.trainer.max_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Lightning counts micro-batches; after a resume with another accumulation (another world
        # size) its counters must be rescaled so optimizer steps stay on the sampler's boundaries.
        realign_loop_progress(checkpoint, self.trainer.accumulate_grad_batches)
        if self.method in PEFT_METHODS and isinstance(checkpoint.get("state_dict"), dict):
            # strict_loading is off for PEFT; check here that exactly the trainable tensors come back.
            saved = set(checkpoint["state_dict"])
            expected = {f"model.{n}" for n, p in self.model.named_parameters() if p.requires_grad}
            if saved != expected:
                raise RuntimeError(
                    f"resume: the checkpoint's tensors do not match this {self.method.value} model "
                    f"(differing: {sorted(saved ^ expected)[:4]}); were finetune.* settings changed?"
                )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Everything `orchestra-generate` and export need, so a checkpoint stands on its own.
        checkpoint["orchestra"] = {
            "format": 1,
            "model_config": to_plain(self.cfg.model),
            "vocab_size": self.vocab_size,
            "tokenizer_json": self.tokenizer_json,
        }
        if self.method in PEFT_METHODS and self.base_reference is not None:
            trainable = {f"model.{n}" for n, p in self.model.named_parameters() if p.requires_grad}
            state = checkpoint.get("state_dict")
            if isinstance(state, dict):
                checkpoint["state_dict"] = {k: v for k, v in state.items() if k in trainable}
            checkpoint["orchestra"]["peft"] = peft_metadata(self.cfg.finetune, self.base_reference)
