"""The LightningModule every task shares: causal LM training (pretrain, sft) and its hooks.

A module owns the training-step logic only. The model comes from orchestra.model and knows
nothing of Lightning; parallelism, precision and checkpoint I/O are the Trainer's business.
:class:`CausalLMModule` builds the model (base weights, task head, fine-tuning method, then
parallelism, in that order) from a :class:`~orchestra.train.plan.RunPlan`; the tasks in
orchestra/train/tasks/ subclass it and change only the head, the loss and the metrics.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig
from torch import nn
from torch.distributed.tensor import DTensor

from orchestra.config import IGNORE_INDEX, StrategyName, accumulation_steps, data_parallel_size, to_plain
from orchestra.model import Transformer, build_model
from orchestra.train.checkpoint.io import PREFIX
from orchestra.train.checkpoint.meta import META_KEY, CheckpointMeta, LastRow, check_tensors
from orchestra.train.context_parallel import ContextParallel
from orchestra.train.finetune import BaseModel, peft_record
from orchestra.train.lightning_compat import realign_loop_progress
from orchestra.train.optim import L2SP, build_optimizer, build_scheduler, layerwise_lr_groups
from orchestra.train.pipeline import Pipeline
from orchestra.train.plan import RunPlan
from orchestra.train.strategy import decoder_of, parallelize


class CausalLMModule(L.LightningModule):
    def __init__(self, plan: RunPlan, datamodule: Any = None) -> None:
        super().__init__()
        self.plan = plan
        self.cfg = plan.config
        self.eos_id = plan.eos_id
        self.eos_ids = plan.stop_ids
        # A Hugging Face base's template and BOS, recorded so an export writes them back.
        self.chat_template = plan.base.chat_template if plan.base is not None else None
        self.bos_id = plan.base.bos_id if plan.base is not None else None
        self.method = plan.method
        self.vocab_size = plan.vocab_size
        self.tokenizer_json = plan.tokenizer_json
        self.precision_name = plan.precision
        self.base: BaseModel | None = plan.base
        self.label_names: list[str] = self._labels(datamodule)
        self.l2sp: L2SP | None = None
        if self.method.frozen_base:
            # PEFT checkpoints hold the trainable tensors only; the frozen rest is rebuilt from the base.
            self.strict_loading = False
        # Plain builtins only, so checkpoints load with weights_only=True.
        self.save_hyperparameters({"config": to_plain(self.cfg), "vocab_size": self.vocab_size}, logger=False)
        self.model: nn.Module | None = None
        # Kept out of the module tree on purpose (a list, not an attribute): a frozen reference
        # model (DPO) must not be saved in checkpoints, wrapped by DDP or handed to DeepSpeed.
        self._frozen_reference: list[nn.Module] = []
        self._step_losses: list[torch.Tensor] = []
        # This rank's loss of the optimizer step being taken, for the loss guard (callbacks/loss_guard.py).
        self.step_loss: torch.Tensor | None = None
        # strategy.cp: this rank's context-parallel group and the row length of the last forward.
        self.context_parallel: ContextParallel | None = None
        self._cp_seq_len: int | None = None
        # strategy.pp: this rank's stages and their schedules, built at the first step (on the device).
        self._pipeline: Pipeline | None = None
        if self.cfg.strategy.name.is_deepspeed:
            # Built now, not in configure_model: Lightning runs that hook under DeepSpeed's
            # zero.Init for ZeRO-3, which partitions parameters before our init scheme could run.
            self.model = self._build_model()

    @property
    def net(self) -> nn.Module:
        """The built model (it exists from configure_model on)."""
        if self.model is None:
            raise RuntimeError("the model is built in configure_model; it does not exist yet")
        return self.model

    def _labels(self, datamodule: Any) -> list[str]:
        """Class names of a classification task (from its data); a language model has none."""
        return []

    def configure_model(self) -> None:
        """Build the model here so FSDP2 can shard it on the device mesh Lightning created."""
        if self.model is not None:
            return
        self.model = self._build_model()

    def _build_model(self) -> nn.Module:
        """Base weights, then the task head, then the fine-tuning method, then parallelism.

        Base weights go in before the method wraps layers and before sharding, so FSDP shards the
        pretrained weights; they are read from the base's files here and not kept afterwards.
        """
        from orchestra.model.build import load_into_meta_model

        mesh = self.device_mesh if self.cfg.strategy.name == StrategyName.fsdp else None
        if self.base is None:
            decoder = build_model(self.cfg.model, self.vocab_size)
        else:
            # No random initialisation and no second copy: the base's tensors become the
            # parameters (converted one at a time to the device and dtype of the init context).
            weights = self.base.state_dict
            decoder = load_into_meta_model(self.cfg.model, self.vocab_size, weights)
            self._after_base(weights, mesh)
            del weights
            self.base = None
        model = self._add_head(decoder)
        model = self.method.apply(model, self.cfg.finetune)
        self._after_method(model)
        if self.cfg.strategy.cp > 1:
            self.context_parallel = ContextParallel.of(mesh)
            self.context_parallel.install(decoder_of(model))
        model = parallelize(model, self.cfg.strategy, self.precision_name, mesh)
        if self.cfg.finetune.l2sp > 0:
            # Reference taken now: pretrained values (a resume loads its state afterwards), sharded like w.
            self.l2sp = L2SP(model, self.cfg.finetune.l2sp)
        return model

    def _after_base(self, weights: dict[str, torch.Tensor], mesh: Any) -> None:
        """Hook for tasks that need the base weights once more (DPO's frozen reference)."""

    def _add_head(self, decoder: Transformer) -> nn.Module:
        """The task's model around the decoder; a language model needs none."""
        return decoder

    def _after_method(self, model: nn.Module) -> None:
        """Hook for heads that must train whatever the method froze."""

    def task_loss(self, batch: Any) -> torch.Tensor:
        """Mean next-token loss; SFT batches are dicts whose packed rows carry segment ids."""
        if self.context_parallel is not None:
            return self._context_parallel_loss(batch)
        if isinstance(batch, dict):
            # Packed rows carry segment ids (a soft prompt is refused with packing by its spec).
            segments = batch["segment_ids"] if self.cfg.task.pack else None
            kwargs = {"segment_ids": segments} if segments is not None else {}
            loss: torch.Tensor = self.net(batch["tokens"], batch["labels"], **kwargs)
        else:
            inputs, labels = batch
            loss = self.net(inputs, labels)
        if isinstance(loss, DTensor):  # tensor parallel: the loss parallel's replicated result
            loss = loss.full_tensor()
        return loss

    def _context_parallel_loss(self, batch: Any) -> torch.Tensor:
        """task_loss on this rank's share of every row (strategy.cp, train/context_parallel.py)."""
        cp = self.context_parallel
        assert cp is not None
        tokens, labels = (batch["tokens"], batch["labels"]) if isinstance(batch, dict) else batch
        self._cp_seq_len = int(tokens.shape[1])
        tokens, labels = cp.shard((tokens, labels))
        with cp.active(self._cp_seq_len), cp.rope(decoder_of(self.net), self._cp_seq_len):
            # Summed, not averaged: a rank's share may hold no target at all (a prompt, padding).
            summed = self.net(tokens, labels, per_sequence=True).sum()
        return cp.mean_loss(summed, labels)

    @contextmanager
    def context_parallel_recompute(self) -> Iterator[None]:
        """Around a backward: recomputed attention under strategy.cp's rule (a no-op otherwise)."""
        if self.context_parallel is None or self._cp_seq_len is None:
            yield
            return
        with self.context_parallel.active(self._cp_seq_len):
            yield

    @property
    def pipeline(self) -> Pipeline | None:
        """strategy.pp: the schedules over this rank's stages (None without pipeline parallelism)."""
        if self.cfg.strategy.pp == 1:
            return None
        if self._pipeline is None:
            st = self.cfg.strategy
            stages = decoder_of(self.net).pipeline_stages
            microbatches = accumulation_steps(
                self.cfg.trainer, data_parallel_size(self.cfg, self.trainer.world_size)
            )
            mesh = self.device_mesh
            assert mesh is not None, "strategy.pp runs under PipelineParallelStrategy's device mesh"
            self._pipeline = Pipeline(
                stages, mesh["pipeline_parallel"], st.pp_schedule, microbatches, self.device
            )
        return self._pipeline

    @staticmethod
    def _rows(batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(tokens, labels, segment ids or None) of a plain or packed batch."""
        if isinstance(batch, dict):
            return batch["tokens"], batch["labels"], batch.get("segment_ids")
        return batch[0], batch[1], None

    def _pipeline_segments(self, batch: Any) -> torch.Tensor | None:
        return self._rows(batch)[2] if self.cfg.task.pack else None

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        pipeline = self.pipeline
        if pipeline is not None:
            # The whole step's rows: the schedule runs their micro-batches forward and backward,
            # so the gradients are cleared here, before it (see optimizer_zero_grad).
            for optimizer in self.trainer.optimizers:
                optimizer.zero_grad(set_to_none=True)
            tokens, labels, _ = self._rows(batch)
            loss = pipeline.train_step(tokens, labels, self._pipeline_segments(batch))
            self._step_losses.append(loss)
            self._log_step_loss()
            return loss
        loss = self.task_loss(batch)
        self._step_losses.append(loss.detach())
        if (batch_idx + 1) % self.trainer.accumulate_grad_batches == 0:
            self._log_step_loss()
        if self.l2sp is not None:
            penalty = self._l2sp_penalty()
            self.log("train/l2sp", penalty.detach(), on_step=True, on_epoch=False)
            return loss + penalty
        return loss

    def backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        """Lightning's backward; under strategy.pp the schedule already ran it in training_step."""
        if self.cfg.strategy.pp > 1:
            return
        super().backward(loss, *args, **kwargs)

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: torch.optim.Optimizer) -> None:
        """Lightning clears gradients between a step's forward and its backward; under strategy.pp
        both run inside training_step, which clears them first."""
        if self.cfg.strategy.pp > 1:
            return
        super().optimizer_zero_grad(epoch, batch_idx, optimizer)

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: int | float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip by the whole model's gradient norm; under strategy.pp that spans every stage."""
        pipeline = self.pipeline
        if pipeline is None:
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        if gradient_clip_val:
            pipeline.clip_grad_norm_(list(self.parameters()), float(gradient_clip_val))

    def _l2sp_penalty(self) -> torch.Tensor:
        assert self.l2sp is not None
        ref = next(iter(self.l2sp.reference.values()))
        if ref.device != self.device:  # the reference was taken before Lightning moved the model
            self.l2sp.to(self.device)
        return self.l2sp.penalty(self.net)

    def _log_step_loss(self) -> None:
        """Log the loss of the whole global batch once per optimizer step.

        The mean over this rank's accumulated micro-batches, averaged over ranks, is the same
        number whatever the split of the global batch, so runs at different world sizes compare.
        Logged from the last micro-batch's training_step, so the checkpoint callbacks that run
        at the end of this batch already see it (on_save_checkpoint records it).
        """
        loss = torch.stack(self._step_losses).mean()
        self._step_losses.clear()
        self.step_loss = loss.detach().clone()
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True, sync_dist=True)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Log the lr of each parameter group and the gradient norm before clipping."""
        # global_step counts steps before this one; Lightning writes rows where (step + 1) % n == 0.
        if (self.global_step + 1) % self.cfg.trainer.log_every_n_steps != 0:
            return
        for i, group in enumerate(optimizer.param_groups):
            self.log(f"train/lr_{group.get('name', i)}", group["lr"], on_step=True, on_epoch=False)
        pipeline = self.pipeline
        if pipeline is not None:  # every rank of the pipeline takes part (a collective)
            self.log(
                "train/grad_norm", pipeline.grad_norm(list(self.parameters())), on_step=True, on_epoch=False
            )
            return
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if grads:
            norm = torch.nn.utils.get_total_norm(grads)
            if isinstance(norm, DTensor):  # FSDP2: each rank holds a shard of the norm's terms
                norm = norm.full_tensor()
            self.log("train/grad_norm", norm, on_step=True, on_epoch=False)

    def on_validation_epoch_start(self) -> None:
        self._val_sums = torch.zeros(2, dtype=torch.float64, device=self.device)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        pipeline = self.pipeline
        if pipeline is not None:
            tokens, labels, _ = self._rows(batch)
            summed, kept = pipeline.eval_sums(tokens, labels, self._pipeline_segments(batch))
            self._val_sums += torch.stack([summed, kept])
            return
        labels = batch["labels"] if isinstance(batch, dict) else batch[1]
        loss = self.task_loss(batch)
        tokens = (labels != IGNORE_INDEX).sum()
        self._val_sums += torch.stack([loss.double() * tokens, tokens.double()])

    def on_validation_epoch_end(self) -> None:
        """Token-weighted mean over all ranks' batches: exact whatever the number of ranks."""
        sums = self.trainer.strategy.reduce(self._val_sums, reduce_op="sum")
        val_loss = float(sums[0] / sums[1])
        self.log("val/loss", val_loss, on_step=False, on_epoch=True, prog_bar=True)
        self.log("val/ppl", math.exp(min(val_loss, 50.0)), on_step=False, on_epoch=True)

    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        offload = self.cfg.strategy.name == StrategyName.deepspeed_zero3_offload
        groups = None
        if self.cfg.finetune.layer_lr_decay < 1.0:
            groups = layerwise_lr_groups(
                self.net, self.cfg.optim.lr, self.cfg.finetune.layer_lr_decay, self.cfg.optim.weight_decay
            )
        deepspeed = self.cfg.strategy.name.value.startswith("deepspeed")
        optimizer = build_optimizer(
            self.net, self.cfg.optim, cpu_offload=offload, groups=groups, deepspeed=deepspeed
        )
        scheduler = build_scheduler(optimizer, self.cfg.scheduler, self.cfg.trainer.max_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Lightning counts micro-batches; after a resume with another accumulation (another world
        # size) its counters must be rescaled so optimizer steps stay on the sampler's boundaries.
        realign_loop_progress(checkpoint, self.trainer.accumulate_grad_batches)
        if not isinstance(checkpoint.get("state_dict"), dict):
            return  # a sharded or DeepSpeed checkpoint: its tensors are read (and checked) by the strategy
        if self.method.frozen_base:
            # strict_loading is off for PEFT; check here that exactly the trainable tensors come back.
            layout = {f"{PREFIX}{n}": tuple(p.shape) for n, p in self._trainable()}
            what = f"this {self.method.name} model (were finetune.* settings changed?)"
        else:
            # One clear error naming the tensor, not torch's size-mismatch traceback from load_state_dict.
            layout = {k: tuple(v.shape) for k, v in self.state_dict().items()}
            what = "this model (were model.* or task settings changed?)"
        check_tensors(checkpoint["state_dict"], layout, self.plan.resume_path or "being resumed", what)

    def _trainable(self) -> list[tuple[str, nn.Parameter]]:
        assert self.model is not None
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def checkpoint_meta(self) -> CheckpointMeta:
        """What this run's checkpoints say about themselves (the one place it is written)."""
        peft = None
        if self.method.frozen_base and self.plan.base_reference is not None:
            peft = peft_record(self.cfg.finetune, self.plan.base_reference)
        last_row = None
        loss = self.trainer.callback_metrics.get("train/loss") if self._trainer is not None else None
        if loss is not None and self.global_step > 0:
            # The row Lightning writes after this hook: a kill in between must not lose it (loggers.py).
            last_row = LastRow(int(self.global_step) - 1, {"train/loss": float(loss)})
        return CheckpointMeta(
            model_config=self.cfg.model,
            vocab_size=self.vocab_size,
            tokenizer_json=self.tokenizer_json,
            task=self.plan.task.name,
            eos_id=self.eos_id,
            eos_ids=self.eos_ids,
            chat_template=self.chat_template,
            bos_id=self.bos_id,
            labels=tuple(self.label_names),
            peft=peft,
            last_row=last_row,
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Everything `orchestra-generate` and export need, so a checkpoint stands on its own.
        meta = self.checkpoint_meta()
        checkpoint[META_KEY] = meta.to_dict()
        if meta.peft is not None and isinstance(checkpoint.get("state_dict"), dict):
            trainable = {f"{PREFIX}{n}" for n, _ in self._trainable()}
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
