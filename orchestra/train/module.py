"""The LightningModules of the tasks: causal LM (pretrain, sft), classification, dpo.

A module owns the training-step logic only. The model comes from orchestra.model and knows
nothing of Lightning; parallelism, precision and checkpoint I/O are the Trainer's business.
:class:`CausalLMModule` builds the model (base weights, task head, fine-tuning method, then
parallelism, in that order) and holds what every task shares; the task subclasses change only
the loss and the validation metrics. :func:`build_module` picks the class for ``task.name``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from orchestra.config import (
    FROZEN_BASE_METHODS,
    FinetuneMethod,
    StrategyName,
    TaskName,
    TrainConfig,
    to_plain,
)
from orchestra.data.datamodule import realign_loop_progress
from orchestra.io import atomic_write_text
from orchestra.model import Transformer
from orchestra.model.heads import SequenceClassifier
from orchestra.model.peft import L2SP, layerwise_lr_groups
from orchestra.train.finetune import PEFT_METHODS, BaseModel, apply_method, peft_disabled, peft_metadata
from orchestra.train.metrics import classification_metrics, dpo_loss
from orchestra.train.optim import build_optimizer, build_scheduler
from orchestra.train.strategy import parallelize


class CausalLMModule(L.LightningModule):
    def __init__(
        self,
        cfg: TrainConfig,
        vocab_size: int,
        tokenizer_json: str = "",
        precision: str = "32-true",
        base: BaseModel | None = None,
        label_names: list[str] | None = None,
        eos_id: int | None = None,
    ) -> None:
        super().__init__()
        self.eos_id = eos_id
        self.cfg = cfg
        self.task = TaskName(cfg.task.name)
        self.label_names = list(label_names or [])
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
        self.model: nn.Module | None = None
        # Kept out of the module tree on purpose (a list, not an attribute): a frozen reference
        # model (DPO) must not be saved in checkpoints, wrapped by DDP or handed to DeepSpeed.
        self._frozen_reference: list[nn.Module] = []
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

    def _build_model(self) -> nn.Module:
        """Base weights, then the task head, then the fine-tuning method, then parallelism.

        Base weights go in before the method wraps layers and before sharding, so FSDP shards the
        pretrained weights; the copy is dropped once loaded.
        """
        decoder = Transformer(self.cfg.model, self.vocab_size)
        model: nn.Module = decoder
        mesh = self.device_mesh if self.cfg.strategy.name == StrategyName.fsdp else None
        if self.base is not None:
            decoder.load_state_dict(self.base.state_dict, strict=True)
            if self.task == TaskName.dpo and self.method not in FROZEN_BASE_METHODS:
                self._frozen_reference.append(self._reference_copy(mesh))
            self.base = None
        model = self._add_head(decoder)
        if self.method != FinetuneMethod.none:
            model = apply_method(model, self.cfg.finetune)
            self._after_method(model)
        model = parallelize(model, self.cfg.strategy, self.precision_name, mesh)
        if self.cfg.finetune.l2sp > 0:
            # Reference taken now: pretrained values (a resume loads its state afterwards), sharded like w.
            self.l2sp = L2SP(model, self.cfg.finetune.l2sp)
        return model

    def _add_head(self, decoder: Transformer) -> nn.Module:
        """The task's model around the decoder; a language model needs none."""
        return decoder

    def _after_method(self, model: nn.Module) -> None:
        """Hook for heads that must train whatever the method froze."""

    def _reference_copy(self, mesh: Any) -> nn.Module:
        assert self.base is not None
        reference = Transformer(self.cfg.model, self.vocab_size)
        reference.load_state_dict(self.base.state_dict, strict=True)
        reference.requires_grad_(False).eval()
        return parallelize(reference, self.cfg.strategy, self.precision_name, mesh)

    def task_loss(self, batch: Any) -> torch.Tensor:
        """Mean next-token loss; SFT batches are dicts whose packed rows carry segment ids."""
        if isinstance(batch, dict):
            segments = (
                batch["segment_ids"] if self.cfg.task.pack and self.method != FinetuneMethod.prompt else None
            )
            kwargs = {"segment_ids": segments} if segments is not None else {}
            return self.model(batch["tokens"], batch["labels"], **kwargs)
        inputs, labels = batch
        return self.model(inputs, labels)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self.task_loss(batch)
        self._step_losses.append(loss.detach())
        if (batch_idx + 1) % self.trainer.accumulate_grad_batches == 0:
            self._log_step_loss()
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

    def _log_step_loss(self) -> None:
        """Log the loss of the whole global batch once per optimizer step.

        The mean over this rank's accumulated micro-batches, averaged over ranks, is the same
        number whatever the split of the global batch, so runs at different world sizes compare.
        Logged from the last micro-batch's training_step, so the checkpoint callbacks that run
        at the end of this batch already see it (on_save_checkpoint records it).
        """
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

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        labels = batch["labels"] if isinstance(batch, dict) else batch[1]
        loss = self.task_loss(batch)
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
            groups = layerwise_lr_groups(
                self.model, self.cfg.optim.lr, self.cfg.finetune.layer_lr_decay, self.cfg.optim.weight_decay
            )
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
            "task": self.task.value,
        }
        loss = self.trainer.callback_metrics.get("train/loss") if self._trainer is not None else None
        if loss is not None and self.global_step > 0:
            # The row Lightning writes after this hook: a kill in between must not lose it (loggers.py).
            checkpoint["orchestra"]["last_row"] = {
                "step": int(self.global_step) - 1,
                "metrics": {"train/loss": float(loss)},
            }
        if self.eos_id is not None:  # a base's own end token (an HF model's may not be <|endoftext|>)
            checkpoint["orchestra"]["eos_id"] = int(self.eos_id)
        if self.label_names:
            checkpoint["orchestra"]["labels"] = list(self.label_names)
        if self.method in PEFT_METHODS and self.base_reference is not None:
            trainable = {f"model.{n}" for n, p in self.model.named_parameters() if p.requires_grad}
            state = checkpoint.get("state_dict")
            if isinstance(state, dict):
                checkpoint["state_dict"] = {k: v for k, v in state.items() if k in trainable}
            checkpoint["orchestra"]["peft"] = peft_metadata(self.cfg.finetune, self.base_reference)


class ClassificationModule(CausalLMModule):
    """Sequence classification: cross-entropy of a linear head on the last token's hidden state.

    Validation accumulates a confusion matrix on every rank, sums it over ranks, and derives
    accuracy, per-class and macro precision / recall / F1 from it (exact at any world size);
    the confusion matrix of the newest validation is written to <run_dir>/classification.json.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if len(self.label_names) < 2:
            raise ValueError(f"task=classification needs at least 2 labels, got {self.label_names}")
        self.last_report: dict[str, Any] = {}

    def _add_head(self, decoder: Transformer) -> nn.Module:
        return SequenceClassifier(decoder, len(self.label_names))

    def _after_method(self, model: nn.Module) -> None:
        # The head is new: it trains under every method, also when the method froze the base.
        model.score.requires_grad_(True)  # type: ignore[union-attr]

    def _logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(batch["tokens"], batch["last_index"])

    def task_loss(self, batch: Any) -> torch.Tensor:
        return F.cross_entropy(self._logits(batch), batch["labels"])

    def on_validation_epoch_start(self) -> None:
        n = len(self.label_names)
        self._confusion = torch.zeros(n, n, dtype=torch.long, device=self.device)
        self._val_sums = torch.zeros(2, dtype=torch.float64, device=self.device)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        logits = self._logits(batch)
        labels = batch["labels"]
        loss = F.cross_entropy(logits, labels, reduction="sum")
        self._val_sums += torch.stack(
            [loss.double(), torch.tensor(float(labels.numel()), device=self.device, dtype=torch.float64)]
        )
        n = len(self.label_names)
        self._confusion += torch.bincount(labels * n + logits.argmax(-1), minlength=n * n).view(n, n)

    def on_validation_epoch_end(self) -> None:
        sums = self.trainer.strategy.reduce(self._val_sums, reduce_op="sum")
        confusion = self.trainer.strategy.reduce(self._confusion, reduce_op="sum").long().cpu()
        n = len(self.label_names)
        # Every (true, predicted) pair back from the counts: the metrics depend on counts only.
        pairs = torch.arange(n * n).repeat_interleave(confusion.flatten())
        target, preds = pairs // n, pairs % n
        metrics, matrix = classification_metrics(preds, target, self.label_names)
        val_loss = float(sums[0] / sums[1])
        self.log("val/loss", val_loss, on_step=False, on_epoch=True, prog_bar=True)
        for key, value in metrics.items():
            self.log(f"val/{key}", value, on_step=False, on_epoch=True, prog_bar=key == "accuracy")
        support = confusion.sum(1)
        majority = float(support.max() / support.sum()) if support.sum() > 0 else float("nan")
        self.log("val/majority_baseline", majority, on_step=False, on_epoch=True)
        self.last_report = {
            "step": int(self.global_step),
            "labels": self.label_names,
            "loss": val_loss,
            "majority_baseline": majority,
            "support": support.tolist(),
            "confusion_matrix": matrix,
            **metrics,
        }
        if self.trainer.is_global_zero and self.cfg.run_dir:
            path = Path(self.cfg.run_dir) / "classification.json"
            atomic_write_text(path, json.dumps(self.last_report, indent=2) + "\n")


class DPOModule(CausalLMModule):
    """Direct Preference Optimization against a frozen reference model.

    Batches hold chosen rows then rejected rows ([2B, T], labels -100 outside the responses).
    The reference is the base model: for LoRA / adapters the same network with the PEFT
    modules switched off (no second copy in memory), for full-weight methods a frozen copy built
    and sharded like the policy (kept outside the module tree, so it is never checkpointed).
    """

    def _sequence_logps(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # per_sequence gives each row's summed NLL over its response tokens.
        return -model(batch["tokens"], batch["labels"], per_sequence=True)

    def on_fit_start(self) -> None:
        # Lightning moved the policy; the reference is outside the module tree, so move it too
        # (a sharded one already lives on its mesh's devices).
        for reference in self._frozen_reference:
            if not isinstance(next(reference.parameters()), DTensor):
                reference.to(self.device)

    def _reference_logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            if self._frozen_reference:
                return self._sequence_logps(self._frozen_reference[0], batch)
            with peft_disabled(self.model):
                return self._sequence_logps(self.model, batch)

    def _dpo(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        reference = self._reference_logps(batch)
        policy = self._sequence_logps(self.model, batch)
        half = policy.shape[0] // 2
        return dpo_loss(policy[:half], policy[half:], reference[:half], reference[half:], self.cfg.task.beta)

    def task_loss(self, batch: Any) -> torch.Tensor:
        loss, chosen, rejected = self._dpo(batch)
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
        loss, chosen, rejected = self._dpo(batch)
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


def build_module(
    cfg: TrainConfig,
    vocab_size: int,
    tokenizer_json: str,
    precision: str,
    base: BaseModel | None = None,
    label_names: list[str] | None = None,
    eos_id: int | None = None,
) -> CausalLMModule:
    """The LightningModule of ``task.name``."""
    cls = {TaskName.classification: ClassificationModule, TaskName.dpo: DPOModule}.get(
        TaskName(cfg.task.name), CausalLMModule
    )
    return cls(cfg, vocab_size, tokenizer_json, precision, base=base, label_names=label_names, eos_id=eos_id)
