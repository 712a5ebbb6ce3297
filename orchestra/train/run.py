"""Assemble one training job, in named phases: plan, data, module, callbacks, trainer, fit, summary.

:func:`train` reads top to bottom as the path of one run::

    plan = plan_run(cfg)                 # every decision, no Lightning object (orchestra/train/plan.py)
    datamodule = build_datamodule(plan)  # the task's data
    module = build_module(plan, datamodule)
    callbacks = build_callbacks(plan)
    trainer = build_trainer(plan, callbacks)
    fit(...)                             # Lightning's fit, then the end-of-run save and validation
    summarize(...)                       # summary.json

The CLI only parses and prints; tests call :func:`train` (or any phase) directly. Nothing here
changes the caller's config: a base model's shape and tokenizer go into the plan's own config.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypedDict

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn

from orchestra.config import (
    ConfigError,
    TrainConfig,
    accumulation_steps,
    base_path,
    data_parallel_size,
    padded_vocab_size,
    require,
    to_plain,
    validate,
)
from orchestra.io import atomic_write_text
from orchestra.train.callbacks import EnergyCallback, ThroughputCallback
from orchestra.train.callbacks.checkpointing import RunCheckpoint
from orchestra.train.callbacks.evaluation import EvaluationCallback, RunEarlyStopping
from orchestra.train.callbacks.loss_guard import (
    GUARD_FILE,
    GuardRecord,
    LossGuard,
    TrainingDiverged,
    resolve_action,
)
from orchestra.train.callbacks.preemption import (
    MARKER_NAME,
    PREEMPTED_EXIT_CODE,
    PreemptionCallback,
    parse_signal,
)
from orchestra.train.callbacks.pruning import TrialPruning
from orchestra.train.checkpoint.io import (
    CHECKPOINT_DIRNAME,
    AtomicCheckpointIO,
    check_deepspeed_world_size,
    check_resume_tensors,
    checkpoint_step,
    find_resume_checkpoint,
    is_deepspeed_checkpoint,
    load_checkpoint_file,
    read_meta,
    scan_checkpoints,
)
from orchestra.train.checkpoint.manifest import verify_checkpoint
from orchestra.train.checkpoint.meta import CheckpointError
from orchestra.train.finetune import BaseModel, load_base
from orchestra.train.flops import model_flops_per_token
from orchestra.train.lightning_compat import (
    LastValidation,
    finish_wandb,
    save_final_checkpoint,
    slurm_plugins,
)
from orchestra.train.loggers import build_loggers
from orchestra.train.memory_probe import check_probe, probe_plan
from orchestra.train.methods import method_spec
from orchestra.train.methods.spec import MethodSpec
from orchestra.train.module import CausalLMModule
from orchestra.train.plan import RunPlan, TaskSpec
from orchestra.train.progress import StepProgressBar
from orchestra.train.rundir import RunRecord, check_resume_allowed, write_record
from orchestra.train.strategy import build_strategy, lightning_precision, recompute_factor, uses_bf16
from orchestra.train.tasks import task_spec
from orchestra.train.watchdog import (
    INTERRUPTED_MARKER,
    SignalWatchdog,
    exit_interrupted,
    is_collective_timeout,
    is_peer_lost,
)

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# The plan: every decision, made before anything is built.
# ---------------------------------------------------------------------------------------------


def validate_run(cfg: TrainConfig) -> None:
    """The whole config: each section, the cross-section rules, then the method's and the task's own.

    The rules between method and task are stated on their specs' properties (does it need a
    base, does it freeze it), never on their names.
    """
    validate(cfg)
    method, task = method_spec(cfg.finetune.method), task_spec(cfg.task.name)
    if method.needs_base:
        require(
            bool(base_path(cfg)),
            "finetune.init_from",
            f"finetune.method={method.name} needs a base model: an Orchestra checkpoint or a Hugging Face "
            "folder, e.g. finetune.init_from=runs/debug/<time>/checkpoints/last.ckpt (or model=hf model.path=...)",
        )
    method.validate(cfg)
    if method.frozen_base:
        # The penalty is over trainable pretrained weights; with the base frozen there are none.
        require(
            cfg.finetune.l2sp == 0,
            "finetune.l2sp",
            f"applies to full-weight methods (full, unfreeze, l2sp) only; with {method.name} the "
            "pretrained weights are frozen",
        )
    if task.needs_base:
        require(
            method.needs_base,
            "task",
            f"task={task.name} adapts a pretrained model: choose finetune=full|lora|adapter|prompt|unfreeze|"
            "l2sp and set finetune.init_from (or model=hf model.path=<folder>)",
        )
    if cfg.strategy.tp > 1:
        _check_tensor_parallel_run(cfg, method, task)
    if cfg.strategy.cp > 1:
        _check_context_parallel_run(cfg, method, task)
    if cfg.strategy.pp > 1:
        _check_pipeline_parallel_run(cfg, method, task)
    check_probe(cfg, task.model_parallel)
    task.validate(cfg)


def _check_tensor_parallel_run(cfg: TrainConfig, method: MethodSpec, task: TaskSpec) -> None:
    """What strategy.tp splits: the decoder and its own loss, with every weight trained."""
    require(
        task.model_parallel,
        "strategy.tp",
        f"task={task.name} has its own head or a second model, which tensor parallelism does not split; "
        "use strategy.tp=1 (FSDP shards it) for this task",
    )
    require(
        not method.frozen_base,
        "strategy.tp",
        f"finetune.method={method.name} wraps the projections tensor parallelism splits; use "
        "finetune=full or unfreeze with strategy.tp, or strategy.tp=1 for this method",
    )
    require(
        not cfg.eval.tasks,
        "eval.tasks",
        "evaluation during training reads the model's full weights and logits, which strategy.tp "
        "splits; evaluate the checkpoints with orchestra-eval instead",
    )


def _check_context_parallel_run(cfg: TrainConfig, method: MethodSpec, task: TaskSpec) -> None:
    """What strategy.cp splits: rows of plain causal attention under the decoder's own loss."""
    require(
        task.model_parallel,
        "strategy.cp",
        f"task={task.name} reads whole rows (a head on the last token, paired sequences), which context "
        "parallelism splits; use strategy.cp=1 for this task",
    )
    require(
        method.reserved_positions(cfg.finetune) == 0,
        "strategy.cp",
        f"finetune.method={method.name} puts virtual tokens before every row, which context parallelism "
        "cannot split; use strategy.cp=1 for this method",
    )
    require(
        task.full_rows or not cfg.task.pack,
        "task.pack",
        "packed rows attend only within their examples, a mask context parallelism does not rebuild; "
        "set task.pack=false with strategy.cp",
    )
    require(
        not cfg.eval.tasks,
        "eval.tasks",
        "evaluation during training scores whole sequences, which strategy.cp splits; evaluate the "
        "checkpoints with orchestra-eval instead",
    )


def _check_pipeline_parallel_run(cfg: TrainConfig, method: MethodSpec, task: TaskSpec) -> None:
    """What strategy.pp splits: the decoder's layers, every weight trained, rows of one length."""
    require(
        task.model_parallel,
        "strategy.pp",
        f"task={task.name} has its own head or a second model, which pipeline parallelism does not "
        "split; use strategy.pp=1 (FSDP shards it) for this task",
    )
    require(
        method.name in ("none", "full"),
        "strategy.pp",
        f"finetune.method={method.name} changes the blocks or the inputs after the stages are cut; "
        "use finetune=full (or none) with strategy.pp, or strategy.pp=1 for this method",
    )
    for flag, key, what in (
        (cfg.finetune.l2sp > 0, "finetune.l2sp", "a penalty over every weight"),
        (cfg.finetune.layer_lr_decay < 1.0, "finetune.layer_lr_decay", "learning rates by depth"),
    ):
        require(
            not flag, key, f"{what} is not combined with strategy.pp yet; turn it off or use strategy.pp=1"
        )
    require(
        task.full_rows or cfg.task.pack,
        "task.pack",
        "pipeline stages exchange activations of one fixed shape, and unpacked rows are padded to "
        "each batch's longest; set task.pack=true with strategy.pp",
    )
    require(
        not cfg.eval.tasks,
        "eval.tasks",
        "evaluation during training reads the whole model, which strategy.pp splits over ranks; "
        "evaluate the checkpoints with orchestra-eval instead",
    )


def resolve_precision(precision: str, accelerator: str) -> str:
    """auto: bf16-mixed on a GPU that supports it, full fp32 elsewhere."""
    if precision != "auto":
        return precision
    on_gpu = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    return "bf16-mixed" if on_gpu and torch.cuda.is_bf16_supported() else "32-true"


def resolve_resume(cfg: TrainConfig, run_dir: Path) -> Path | None:
    """The checkpoint this run continues from (None: from scratch).

    resume=auto names every checkpoint it passes over and why; a run dir whose checkpoints are
    all unusable is refused rather than silently trained again from step 0.
    """
    if cfg.resume == "never":
        return None
    if cfg.resume != "auto":
        path = Path(cfg.resume)
        verify_checkpoint(path)  # a manifest that disagrees with the files is refused, naming the file
        load_checkpoint_file(path)  # raises CheckpointError naming the file if unusable
        return path
    scan = scan_checkpoints(run_dir)
    for path, reason in scan.skipped:
        _warn(f"resume=auto: skipping checkpoint {path}: {reason}")
    if scan.best is None and scan.skipped:
        listed = "".join(f"\n  - {path}: {reason}" for path, reason in scan.skipped)
        raise CheckpointError(
            f"resume=auto: no usable checkpoint in {run_dir / CHECKPOINT_DIRNAME}, and it is not empty:{listed}\n"
            "nothing was changed; to train from step 0 in this run dir pass resume=never (the files "
            "above are left as they are), or resume=<checkpoint> to name a good one"
        )
    if scan.best is not None and scan.skipped:
        _warn(f"resume=auto: resuming from {scan.best}, the newest intact checkpoint")
    return scan.best


def _warn(message: str) -> None:
    """On the console (rank zero) and in the run's train.log."""
    rank_zero_warn(message)
    log.warning(message)


def config_with_base(cfg: TrainConfig, base: BaseModel, run_dir: Path) -> TrainConfig:
    """A new config running on ``base``: its shape and its tokenizer (``cfg`` is not changed).

    The base tokenizer is written to <run_dir>/base_tokenizer.json and the data is prepared with
    it, under a data.name suffixed with the tokenizer's hash: the dataset fingerprint already
    includes that hash, so without the suffix a dataset of the same name made with another
    tokenizer would be refused instead of a matching one being built next to it.
    """
    init_from = base_path(cfg)
    tokenizer_file = run_dir / "base_tokenizer.json"
    if cfg.data.tokenizer_path:
        given = Path(cfg.data.tokenizer_path)
        if not given.is_file() or given.read_text() != base.tokenizer_json:
            raise ConfigError(
                f"data.tokenizer_path: {given} is not the tokenizer of finetune.init_from={init_from}; "
                "leave data.tokenizer_path unset, fine-tuning uses the base model's tokenizer"
            )
    atomic_write_text(tokenizer_file, base.tokenizer_json, only_if_changed=True)
    digest = hashlib.sha256(base.tokenizer_json.encode()).hexdigest()[:12]
    name = cfg.data.name if cfg.data.name.endswith(f"-tok{digest}") else f"{cfg.data.name}-tok{digest}"
    # The base's shape with the run's own kernel choice (numerics-neutral, device-dependent).
    model = replace(base.model_config, vocab_size=base.vocab_size, kernels=cfg.model.kernels, path=None)
    return replace(
        cfg,
        model=model,
        data=replace(cfg.data, tokenizer_path=str(tokenizer_file), name=name),
        finetune=replace(cfg.finetune, init_from=init_from),
    )


def plan_run(cfg: TrainConfig) -> RunPlan:
    """Validate ``cfg`` and decide everything the run needs (prepares the pretraining corpus)."""
    from orchestra.data.dataset import load_manifest
    from orchestra.data.pack import prepare_dataset

    validate_run(cfg)
    run_dir = Path(cfg.run_dir or "runs/unnamed").resolve()
    method, task = method_spec(cfg.finetune.method), task_spec(cfg.task.name)
    world_size = cfg.trainer.world_size

    init_from = base_path(cfg)
    base = (
        load_base(init_from) if method.needs_base and init_from else None
    )  # validate_run: a base iff needed
    if base is not None:
        cfg = config_with_base(cfg, base, run_dir)
        validate_run(cfg)  # the effective config, as a whole
    scheduler, warning = cfg.scheduler.fitted_to(cfg.trainer.max_steps)
    if warning is not None:
        rank_zero_warn(warning)
        cfg = replace(cfg, scheduler=scheduler)
    seq_len = cfg.model.max_seq_len
    if base is not None and cfg.finetune.seq_len:
        # The base's context can be far longer than the fine-tuning data needs (32k for many HF
        # models): rows are cut to finetune.seq_len, the model keeps its full context.
        seq_len = min(seq_len, cfg.finetune.seq_len)
    seq_len -= method.reserved_positions(cfg.finetune)

    dataset_dir: Path | None = None
    if task.full_rows:  # the packed corpus of the data group (with a base: tokenized with its tokenizer)
        dataset_dir = Path(prepare_dataset(cfg.data, seed=cfg.seed))
        manifest = load_manifest(dataset_dir)
        tokenizer_vocab, eos_id = int(manifest["vocab_size"]), int(manifest["eos_id"])
        tokenizer_json = (dataset_dir / "tokenizer.json").read_text()
    else:
        assert base is not None  # validate_run: every task but pretraining needs a base
        tokenizer_vocab, eos_id, tokenizer_json = base.vocab_size, base.eos_id, base.tokenizer_json
    vocab_size = padded_vocab_size(cfg.model, tokenizer_vocab)
    # Generation stops on every EOS of the base (Llama 3.x Instruct: three), the data's own first.
    eos_ids = tuple(dict.fromkeys([eos_id, *(base.eos_ids if base is not None else ())]))

    resume_path = resolve_resume(cfg, run_dir)
    resume_step, last_row = None, None
    if resume_path is not None and is_deepspeed_checkpoint(resume_path):
        check_deepspeed_world_size(resume_path, cfg.strategy.name.value, world_size)
    if resume_path is not None:
        meta = read_meta(resume_path)
        peft_method = method.name if method.frozen_base else None
        base_ref = base.reference if base is not None else None
        meta.check_compatible(resume_path, cfg.model, vocab_size, peft_method, base_ref)
        if task.lm_head and not method.frozen_base:  # the whole decoder is in the file: check it now
            check_resume_tensors(resume_path, cfg.model, vocab_size)
        resume_step, last_row = checkpoint_step(resume_path), meta.last_row
    # After the fit check, so a checkpoint that cannot fit is named as such first; an explicit
    # resume=<checkpoint> takes the run dir over (orchestra/train/rundir.py).
    record = RunRecord.of(cfg)
    if resume_path is not None and cfg.resume == "auto":
        check_resume_allowed(run_dir, record)
    write_record(run_dir, record)
    skip_steps = set(cfg.data.skip_steps)
    if resume_path is not None:  # the data windows the loss guard's rollbacks skipped in this dir
        skip_steps.update(GuardRecord.read(run_dir / GUARD_FILE).skip_steps)

    plan = RunPlan(
        config=cfg,
        run_dir=run_dir,
        method=method,
        task=task,
        vocab_size=vocab_size,
        seq_len=seq_len,
        tokenizer_json=tokenizer_json,
        eos_id=eos_id,
        precision=resolve_precision(cfg.trainer.precision, cfg.trainer.accelerator),
        world_size=world_size,
        # strategy.pp: Lightning sees one batch per step (a rank's whole share of the global
        # batch); the pipeline schedule cuts it into the micro-batches.
        accumulation=1 if cfg.strategy.pp > 1 else accumulation_steps(cfg.trainer, data_parallel_size(cfg)),
        dataset_dir=dataset_dir,
        base=base,
        resume_path=resume_path,
        resume_step=resume_step,
        last_row=last_row,
        skip_steps=tuple(sorted(skip_steps)),
        eos_ids=eos_ids,
    )
    # Measured on the device, so after every check above: a refused config costs no probe.
    return probe_plan(plan) if cfg.trainer.memory_probe else plan


# ---------------------------------------------------------------------------------------------
# The objects: data, module, callbacks, trainer.
# ---------------------------------------------------------------------------------------------


def build_datamodule(plan: RunPlan) -> L.LightningDataModule:
    return plan.task.build_datamodule(plan)


def build_module(plan: RunPlan, datamodule: L.LightningDataModule) -> CausalLMModule:
    """The LightningModule of the plan's task (it builds the model in configure_model)."""
    module: CausalLMModule = plan.task.module(plan, datamodule)
    return module


@dataclass
class RunCallbacks:
    """The callbacks of a run; the ones the end of the run reads back are named."""

    checkpointing: RunCheckpoint
    throughput: ThroughputCallback
    energy: EnergyCallback
    last_validation: LastValidation
    preemption: PreemptionCallback
    guard: LossGuard
    extra: list[Callback]
    pruning: TrialPruning | None = None  # a sweep's trial: reports to the study, may stop the run

    def all(self) -> list[Callback]:
        # The guard before the checkpointing: it pauses saves in the step it trips.
        return [
            self.guard,
            self.checkpointing,
            self.throughput,
            self.last_validation,
            self.preemption,
            *self.extra,
            *([self.pruning] if self.pruning is not None else []),
        ]


def build_callbacks(
    plan: RunPlan, watchdog: SignalWatchdog | None = None, restarted: bool = False
) -> RunCallbacks:
    """The run's callbacks; ``restarted``: this fit follows a loss-guard rollback in this process."""
    cfg, t = plan.config, plan.config.trainer
    flops = model_flops_per_token(
        cfg.model,
        plan.vocab_size,
        plan.seq_len,
        weight_grads=not plan.method.frozen_base,
        lm_head=plan.task.lm_head,
    )
    energy = EnergyCallback(cfg.energy, plan.run_dir / "emissions", plan.tokens_per_step)
    extra = list(plan.method.callbacks(cfg.finetune, cfg.model))
    if cfg.energy.enabled:
        extra.append(energy)
    if t.progress_bar:
        extra.append(StepProgressBar(leave=True))
    if cfg.eval.tasks:
        base = plan.base
        extra.append(
            EvaluationCallback(
                cfg.eval,
                plan.tokenizer_json,
                plan.stop_ids,
                bos_id=base.bos_id if base is not None and base.add_bos else None,
                chat_template=cfg.task.chat_template or (base.chat_template if base is not None else None),
            )
        )
    if cfg.eval.early_stopping is not None:
        extra.append(RunEarlyStopping(cfg.eval, plan.run_dir))
    checkpointing = RunCheckpoint(
        dirpath=plan.run_dir / CHECKPOINT_DIRNAME,
        filename="step{step:07d}",
        auto_insert_metric_name=False,
        monitor="step",
        mode="max",
        save_top_k=t.keep_last_checkpoints,
        every_n_train_steps=t.ckpt_every_n_steps,
        save_last=True,
    )
    return RunCallbacks(
        checkpointing=checkpointing,
        throughput=ThroughputCallback(
            plan.tokens_per_step,
            flops,
            t.log_every_n_steps,
            t.peak_flops,
            recompute_factor(cfg.strategy, cfg.model.n_layers),
        ),
        energy=energy,
        last_validation=LastValidation(),
        preemption=PreemptionCallback(
            plan.run_dir / CHECKPOINT_DIRNAME,
            plan.run_dir / MARKER_NAME,
            signals=(t.preempt_signal, "TERM"),
            watchdog=watchdog,
        ),
        guard=LossGuard(
            resolve_action(t.guard, cfg.strategy.name.is_deepspeed),
            t.guard_spike_factor,
            t.guard_warmup_steps,
            t.guard_window_steps,
            t.guard_max_events,
            plan.run_dir / GUARD_FILE,
            skip_steps=plan.skip_steps,
            pause_checkpoints=checkpointing.pause,
            fresh=plan.resume_path is None and not restarted,
        ),
        extra=extra,
        pruning=TrialPruning(cfg.trial, plan.run_dir) if cfg.trial.study is not None else None,
    )


def build_trainer(plan: RunPlan, callbacks: RunCallbacks) -> L.Trainer:
    cfg, t = plan.config, plan.config.trainer
    # Before the Trainer exists: rank from the launcher's environment (torchrun, srun, Lightning).
    is_zero = all(
        int(os.environ.get(k, "0")) == 0 for k in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK")
    )
    last_row = plan.last_row.to_dict() if plan.last_row is not None else None
    if cfg.strategy.fp8 != "off" and is_zero:
        log.info(
            "strategy.fp8=%s: MFU is reported against the device's bf16 peak, as for any run; FP8 "
            "matmuls may run up to 2x faster, so an MFU above the usual 40-60 %% means FP8 at work, "
            "not more of the bf16 peak used",
            cfg.strategy.fp8,
        )
    loggers = build_loggers(
        cfg.logger, plan.run_dir, cfg.name, to_plain(cfg), plan.resume_step, is_zero, last_row
    )
    return L.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=build_strategy(cfg, plan.precision),
        precision=lightning_precision(cfg, plan.precision),  # type: ignore[arg-type]
        max_steps=t.max_steps,
        max_epochs=-1,
        accumulate_grad_batches=plan.accumulation,
        # DeepSpeed clips inside its engine (gradient_clipping in the generated config).
        gradient_clip_val=None if cfg.strategy.name.is_deepspeed else (t.grad_clip or None),
        val_check_interval=t.val_every_n_steps * plan.accumulation,
        check_val_every_n_epoch=None,
        limit_val_batches=1.0,  # the val sampler fixes the set (trainer.val_batches micro-batches)
        num_sanity_val_steps=0,
        log_every_n_steps=t.log_every_n_steps,
        callbacks=callbacks.all(),
        logger=loggers,
        plugins=[AtomicCheckpointIO(), *slurm_plugins()],
        use_distributed_sampler=False,
        enable_progress_bar=t.progress_bar,
        enable_model_summary=False,
        default_root_dir=str(plan.run_dir),
    )


# ---------------------------------------------------------------------------------------------
# Fit and summary.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rollback:
    """A loss-guard rollback: train again from ``checkpoint`` (None: step 0), skipping ``skip_steps``."""

    checkpoint: Path | None
    skip_steps: tuple[int, ...]


def rollback_plan(cfg: TrainConfig, rollback: Rollback) -> RunPlan:
    """The plan of the fit after a rollback: from the good checkpoint, the new window skipped."""
    resume = str(rollback.checkpoint) if rollback.checkpoint is not None else "never"
    plan = plan_run(replace(cfg, resume=resume))
    return replace(plan, skip_steps=tuple(sorted(set(plan.skip_steps) | set(rollback.skip_steps))))


def fit(
    plan: RunPlan,
    trainer: L.Trainer,
    module: CausalLMModule,
    datamodule: L.LightningDataModule,
    callbacks: RunCallbacks,
) -> dict[str, float] | Rollback:
    """Lightning's fit, then what it leaves undone: the final save and the final validation.

    A preemption leaves at once with the status the batch script requeues on; a loss guard that
    stopped the run raises :class:`TrainingDiverged` or, for a rollback, returns where to go back
    to. Otherwise returns the final callback metrics as plain numbers.
    """
    ckpt_path = str(plan.resume_path) if plan.resume_path else None
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    if callbacks.guard.tripped is not None:
        good = trainer.strategy.broadcast(find_resume_checkpoint(plan.run_dir))
        finish_wandb(trainer)
        if callbacks.guard.tripped.action == "stop":
            raise TrainingDiverged(callbacks.guard.report(Path(good) if good else None))
        return Rollback(Path(good) if good else None, tuple(callbacks.guard.record.skip_steps))
    if callbacks.preemption.preempted:
        # Checkpoint saved on a warning signal (slurm/pretrain.sh requeues); the rest comes after.
        raise SystemExit(PREEMPTED_EXIT_CODE)
    # Sizes only: this run wrote these files moments ago, hashing them again would reread them all.
    newest = trainer.strategy.broadcast(find_resume_checkpoint(plan.run_dir, hashes=False))
    last = plan.run_dir / CHECKPOINT_DIRNAME / "last.ckpt"
    save_final_checkpoint(trainer, callbacks.checkpointing, Path(newest) if newest else None, last)
    finish = getattr(trainer.strategy, "finish_checkpoint", None)
    if finish is not None:  # strategy.async_checkpoint: the final save is published before the summary
        finish()
    if callbacks.last_validation.step != trainer.global_step:
        trainer.validate(module, datamodule=datamodule, verbose=False)
    finish_wandb(trainer)
    return {k: v.item() if torch.is_tensor(v) else v for k, v in trainer.callback_metrics.items()}


def sample_text(
    model: torch.nn.Module,
    tokenizer_json: str,
    prompt: str,
    max_new_tokens: int,
    eos_ids: Sequence[int],
    device: torch.device,
    precision: str,
    seed: int,
) -> str:
    """A short seeded continuation of ``prompt`` for the end-of-run summary.

    Every rank calls this in lockstep (same seed, same logits): a sharded model's forward is a
    collective, so rank zero cannot run it alone.
    """
    from tokenizers import Tokenizer

    from orchestra.model import PromptTunedModel, Transformer
    from orchestra.model.generate import context_length, generate

    assert isinstance(model, (Transformer, PromptTunedModel)), type(model)
    tokenizer = Tokenizer.from_str(tokenizer_json)
    ids = torch.tensor([tokenizer.encode(prompt).ids or [eos_ids[0]]], device=device)
    # A soft prompt (finetune=prompt) takes the first positions of the context.
    budget = max(0, min(max_new_tokens, context_length(model) - ids.shape[1]))
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.autocast(
        device.type, dtype=torch.bfloat16, enabled=uses_bf16(precision) and device.type == "cuda"
    ):
        out = generate(
            model, ids, max_new_tokens=budget, temperature=0.8, top_k=50, eos_id=eos_ids, generator=gen
        )
    return tokenizer.decode(out[0].tolist())


def _metric(metrics: dict[str, Any], key: str) -> float | None:
    value = metrics.get(key)
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _stall(strategy: Any) -> float | None:
    stalls = getattr(strategy, "checkpoint_stalls", None)
    return round(sum(stalls), 4) if stalls else None


class RunSummary(TypedDict):
    """summary.json: what a run did, in the units users compare runs by."""

    steps: int
    tokens: int
    train_loss: float | None
    val_loss: float | None
    val_ppl: float | None
    task: str
    finetune: str
    val_metrics: dict[str, float | None]
    tokens_per_s: float | None
    mfu: float | None
    energy_kwh: float | None
    co2_kg: float | None
    j_per_token: float | None
    checkpoint: str | None
    resumed_from: str | None
    wall_s: float
    parameters: int
    trainable_parameters: int
    peak_mem_gb: float | None
    precision: str
    strategy: str
    world_size: int
    guard_events: int
    # Seconds the training loop waited for checkpoint saves in all (sharded strategies; rank 0).
    checkpoint_stall_s: float | None
    run_dir: str
    dataset: str | None  # the prepared dataset's folder (its manifest, its data card)
    trial: dict[str, Any] | None  # a sweep's trial: study, number, whether it was pruned and when


def summarize(
    plan: RunPlan,
    trainer: L.Trainer,
    module: CausalLMModule,
    callbacks: RunCallbacks,
    metrics: dict[str, float],
    wall_s: float,
) -> RunSummary | None:
    """The run's summary; rank zero writes summary.json, the other ranks get None."""
    if not trainer.is_global_zero:
        return None
    assert module.model is not None
    perf, energy = callbacks.throughput.summary(), callbacks.energy.result
    ckpt = callbacks.checkpointing
    last_ckpt = Path(ckpt.last_model_path or ckpt.best_model_path or "")
    steps = int(trainer.global_step)
    tokens_per_step = plan.tokens_per_step
    summary: RunSummary = {
        "steps": steps,
        # Fine-tuning: the positions counted in the measured windows (padding included).
        "tokens": steps * tokens_per_step if tokens_per_step else int(perf["tokens"] or 0),
        "train_loss": _metric(metrics, "train/loss"),
        "val_loss": _metric(metrics, "val/loss"),
        "val_ppl": _metric(metrics, "val/ppl"),
        "task": plan.task.name,
        "finetune": plan.method.name,
        "val_metrics": {k[4:]: _metric(metrics, k) for k in sorted(metrics) if k.startswith("val/")},
        "tokens_per_s": perf["tokens_per_s"],
        "mfu": perf["mfu"],
        "energy_kwh": energy["energy_kwh"],
        "co2_kg": energy["co2_kg"],
        "j_per_token": energy["j_per_token"],
        "checkpoint": str(last_ckpt) if last_ckpt.name else None,
        "resumed_from": str(plan.resume_path) if plan.resume_path else None,
        "wall_s": wall_s,
        "parameters": sum(p.numel() for p in module.model.parameters()),
        "trainable_parameters": sum(p.numel() for p in module.model.parameters() if p.requires_grad),
        "peak_mem_gb": (torch.cuda.max_memory_allocated() / 2**30) if torch.cuda.is_available() else None,
        "precision": plan.precision,
        "strategy": plan.config.strategy.name.value,
        "world_size": trainer.world_size,
        "guard_events": len(callbacks.guard.record.events),
        "checkpoint_stall_s": _stall(trainer.strategy),
        "run_dir": str(plan.run_dir),
        "dataset": str(plan.dataset_dir.resolve()) if plan.dataset_dir else None,
        "trial": callbacks.pruning.record() if callbacks.pruning is not None else None,
    }
    atomic_write_text(plan.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


@dataclass
class RunResult:
    # Empty on every rank but zero (only rank zero summarises).
    summary: RunSummary | dict[str, Any]
    sample: str
    run_dir: Path
    # The trained module, for callers (tests) that inspect weights in memory.
    module: L.LightningModule | None = None


def train(cfg: TrainConfig) -> RunResult:
    """Run one training job described by a config; returns its summary.

    A stop signal nothing answers and a collective that times out both end the process with
    INTERRUPTED_EXIT_CODE (orchestra/train/watchdog.py) instead of hanging. A loss-guard
    rollback builds the run again from its newest good checkpoint, in this process.
    """
    plan = plan_run(cfg)
    t = plan.config.trainer
    marker = plan.run_dir / INTERRUPTED_MARKER
    started = time.time()
    with SignalWatchdog(t.signal_grace_s, marker, _stop_signals(t.preempt_signal)) as watchdog:
        restarted = False
        while True:
            L.seed_everything(plan.config.seed, workers=True, verbose=False)
            datamodule = build_datamodule(plan)
            module = build_module(plan, datamodule)
            callbacks = build_callbacks(plan, watchdog, restarted)
            trainer = build_trainer(plan, callbacks)
            try:
                outcome = fit(plan, trainer, module, datamodule, callbacks)
                if isinstance(outcome, Rollback):
                    _warn(
                        f"loss guard: rolling back to {outcome.checkpoint or 'step 0'}, skipping data steps "
                        f"{list(outcome.skip_steps)}"
                    )
                    plan, restarted = rollback_plan(cfg, outcome), True
                    continue
                sample = ""
                split = [k for k in ("tp", "pp") if getattr(plan.config.strategy, k) > 1]
                if plan.task.lm_head and split:
                    # Decoding one token at a time cannot be split over the sequence, and no
                    # rank of a pipeline holds the whole model; the checkpoint samples with
                    # orchestra-generate instead.
                    log.info(
                        "no end-of-run sample under strategy.%s; use orchestra-generate on a checkpoint",
                        split[0],
                    )
                elif plan.task.lm_head:  # a classifier has no language-model head to sample from
                    sample = sample_text(
                        module.net,
                        plan.tokenizer_json,
                        t.sample_prompt,
                        t.sample_tokens,
                        plan.stop_ids,
                        trainer.strategy.root_device,
                        plan.precision,
                        plan.config.seed,
                    )
            except Exception as err:
                first_line = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}"
                if trainer.world_size > 1 and is_collective_timeout(err):
                    exit_interrupted(
                        marker,
                        f"a collective waited longer than trainer.collective_timeout_s={t.collective_timeout_s:g} s "
                        f"for the other ranks ({first_line})",
                    )
                if trainer.world_size > 1 and is_peer_lost(err):
                    exit_interrupted(marker, f"another rank is gone ({first_line})")
                raise
            break
        summary = summarize(plan, trainer, module, callbacks, outcome, time.time() - started)
    return RunResult(summary=summary or {}, sample=sample, run_dir=plan.run_dir, module=module)


def _stop_signals(preempt_signal: str) -> tuple[signal.Signals, ...]:
    return tuple(dict.fromkeys((parse_signal(preempt_signal), signal.SIGTERM)))
