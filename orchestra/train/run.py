"""Assemble one training job: data, model, callbacks, loggers, Trainer; then summarise it.

This is the single place where the validated config turns into objects. The CLI only parses and
prints; tests call :func:`train` directly.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, RichProgressBar
from lightning.pytorch.loggers import WandbLogger

from orchestra.config import (
    FROZEN_BASE_METHODS,
    ConfigError,
    FinetuneMethod,
    TaskName,
    TrainConfig,
    accumulation_steps,
    base_path,
    padded_vocab_size,
    to_plain,
    validate,
)
from orchestra.io import atomic_write_text
from orchestra.train.callbacks import EnergyCallback, ThroughputCallback
from orchestra.train.callbacks.preemption import MARKER_NAME, PREEMPTED_EXIT_CODE, PreemptionCallback
from orchestra.train.callbacks.unfreeze import GradualUnfreezing
from orchestra.train.checkpoint import (
    CHECKPOINT_DIRNAME,
    AtomicCheckpointIO,
    CheckpointError,
    checkpoint_step,
    find_resume_checkpoint,
    load_checkpoint_file,
)
from orchestra.train.finetune import PEFT_METHODS, BaseModel, base_model_config, load_base
from orchestra.train.flops import model_flops_per_token
from orchestra.train.loggers import build_loggers
from orchestra.train.module import build_module
from orchestra.train.strategy import build_strategy, lightning_precision, recompute_factor, uses_bf16


@dataclass
class RunResult:
    summary: dict[str, Any]
    sample: str
    run_dir: Path
    # The trained module, for callers (tests) that inspect weights in memory.
    module: L.LightningModule | None = None


def resolve_precision(precision: str, accelerator: str) -> str:
    """auto: bf16-mixed on a GPU that supports it, full fp32 elsewhere."""
    if precision != "auto":
        return precision
    on_gpu = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    return "bf16-mixed" if on_gpu and torch.cuda.is_bf16_supported() else "32-true"


def resolve_resume(cfg: TrainConfig, run_dir: Path) -> Path | None:
    if cfg.resume == "never":
        return None
    if cfg.resume == "auto":
        return find_resume_checkpoint(run_dir)
    path = Path(cfg.resume)
    load_checkpoint_file(path)  # raises CheckpointError naming the file if unusable
    return path


def check_checkpoint_matches(
    path: Path, cfg: TrainConfig, vocab_size: int, base_reference: dict[str, str] | None = None
) -> tuple[int, dict[str, Any] | None]:
    """Refuse a checkpoint of another model shape before Lightning fails deep inside load_state_dict."""
    ckpt = load_checkpoint_file(path)
    meta = ckpt.get("orchestra")
    if meta is None:
        raise CheckpointError(f"checkpoint {path} carries no Orchestra metadata; cannot resume from it")
    saved, current = meta["model_config"], to_plain(cfg.model)
    shape_keys = ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "tie_embeddings")
    diffs = [
        f"model.{k}: checkpoint {saved.get(k)!r} vs config {current[k]!r}"
        for k in shape_keys
        if saved.get(k) != current[k]
    ]
    if meta["vocab_size"] != vocab_size:
        diffs.append(f"vocab size: checkpoint {meta['vocab_size']} vs data/config {vocab_size}")
    peft, method = meta.get("peft"), FinetuneMethod(cfg.finetune.method)
    saved_method = peft["method"] if peft else None
    current_method = method.value if method in PEFT_METHODS else None
    if saved_method != current_method:
        diffs.append(f"finetune.method: checkpoint {saved_method or 'full weights'} vs config {method.value}")
    elif peft and base_reference and peft["base"]["sha256"] != base_reference["sha256"]:
        # The checkpoint holds only the trainable tensors: on another base they would mean nothing.
        diffs.append(
            f"base model: checkpoint trained on {peft['base']['path']} (sha256 "
            f"{peft['base']['sha256'][:12]}), finetune.init_from is {base_reference['path']} "
            f"(sha256 {base_reference['sha256'][:12]})"
        )
    if diffs:
        raise CheckpointError(f"checkpoint {path} does not fit this model: " + "; ".join(diffs))
    # (its step, the metrics row it carries for the logger, see loggers.py)
    return int(ckpt["global_step"]), meta.get("last_row")


def use_base(cfg: TrainConfig, run_dir: Path) -> BaseModel:
    """Load finetune.init_from and make the run use its shape and tokenizer (cfg is changed in place).

    The base tokenizer is written to <run_dir>/base_tokenizer.json and the data is prepared with
    it, under a data.name suffixed with the tokenizer's hash: the dataset fingerprint already
    includes that hash, so without the suffix a dataset of the same name made with another
    tokenizer would be refused instead of a matching one being built next to it.
    """
    import hashlib

    cfg.finetune.init_from = base_path(cfg)
    base = load_base(str(cfg.finetune.init_from))
    cfg.model = base_model_config(base, cfg.model)
    tokenizer_file = run_dir / "base_tokenizer.json"
    if cfg.data.tokenizer_path:
        given = Path(cfg.data.tokenizer_path)
        if not given.is_file() or given.read_text() != base.tokenizer_json:
            raise ConfigError(
                f"data.tokenizer_path: {given} is not the tokenizer of finetune.init_from={cfg.finetune.init_from}; "
                "leave data.tokenizer_path unset, fine-tuning uses the base model's tokenizer"
            )
    atomic_write_text(tokenizer_file, base.tokenizer_json, only_if_changed=True)
    digest = hashlib.sha256(base.tokenizer_json.encode()).hexdigest()[:12]
    cfg.data.tokenizer_path = str(tokenizer_file)
    if not cfg.data.name.endswith(f"-tok{digest}"):
        cfg.data.name = f"{cfg.data.name}-tok{digest}"
    return base


class _LastValidation(Callback):
    """Remembers the step of the newest validation so the end of a run is validated exactly once."""

    def __init__(self) -> None:
        self.step = -1

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.step = trainer.global_step


def _metric(metrics: dict[str, Any], key: str) -> float | None:
    value = metrics.get(key)
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _slurm_plugins() -> list[Any]:
    """Under srun: Lightning's SLURM environment, but never its in-handler requeue.

    Lightning's auto_requeue saves inside the signal handler (a collective at an arbitrary point);
    PreemptionCallback saves at a step boundary and slurm/pretrain.sh requeues instead.
    """
    from lightning.fabric.plugins.environments import SLURMEnvironment

    if not SLURMEnvironment.detect():
        return []
    if os.environ.get("SLURM_PROCID", "0") == "0":
        print(
            f"SLURM job {os.environ.get('SLURM_JOB_ID')}: SLURM_RESTART_COUNT="
            f"{os.environ.get('SLURM_RESTART_COUNT', '0')}",
            flush=True,
        )
    return [SLURMEnvironment(auto_requeue=False)]


def sample_text(
    model: torch.nn.Module,
    tokenizer_json: str,
    prompt: str,
    max_new_tokens: int,
    eos_id: int,
    device: torch.device,
    precision: str,
    seed: int,
) -> str:
    """A short seeded continuation of ``prompt`` for the end-of-run summary.

    Every rank calls this in lockstep (same seed, same logits): a sharded model's forward is a
    collective, so rank zero cannot run it alone.
    """
    from tokenizers import Tokenizer

    from orchestra.model.generate import context_length, generate

    tokenizer = Tokenizer.from_str(tokenizer_json)
    ids = torch.tensor([tokenizer.encode(prompt).ids or [eos_id]], device=device)
    # A soft prompt (finetune=prompt) takes the first positions of the context.
    budget = max(0, min(max_new_tokens, context_length(model) - ids.shape[1]))
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.autocast(
        device.type, dtype=torch.bfloat16, enabled=uses_bf16(precision) and device.type == "cuda"
    ):
        out = generate(
            model, ids, max_new_tokens=budget, temperature=0.8, top_k=50, eos_id=eos_id, generator=gen
        )
    return tokenizer.decode(out[0].tolist())


def train(cfg: TrainConfig) -> RunResult:
    """Run one training job described by a validated config; returns its summary."""
    # Imported here so `orchestra.train` stays importable without building the data stack.
    from orchestra.data.datamodule import TokenDataModule
    from orchestra.data.dataset import load_manifest
    from orchestra.data.pack import prepare_dataset

    validate(cfg)
    run_dir = Path(cfg.run_dir or "runs/unnamed").resolve()
    t = cfg.trainer
    world_size = t.devices * t.num_nodes
    accumulation = accumulation_steps(t, world_size)

    base = use_base(cfg, run_dir) if base_path(cfg) else None
    task = TaskName(cfg.task.name)
    method = FinetuneMethod(cfg.finetune.method)
    seq_len = cfg.model.max_seq_len
    if base is not None and cfg.finetune.seq_len:
        # The base's context can be far longer than the fine-tuning data needs (32k for many HF
        # models): rows are cut to finetune.seq_len, the model keeps its full context.
        seq_len = min(seq_len, cfg.finetune.seq_len)
    if method == FinetuneMethod.prompt:
        seq_len -= cfg.finetune.prompt_tokens  # the soft prompt takes the first positions of every row
    if task == TaskName.pretrain:
        dataset_dir = prepare_dataset(cfg.data, seed=cfg.seed)
        manifest = load_manifest(dataset_dir)
        tokenizer_vocab, eos_id = int(manifest["vocab_size"]), int(manifest["eos_id"])
        tokenizer_json = (Path(dataset_dir) / "tokenizer.json").read_text()
    else:
        assert base is not None  # validate() requires a base for every task but pretrain
        tokenizer_json, eos_id = base.tokenizer_json, base.eos_id
        tokenizer_vocab = base.vocab_size
    vocab_size = padded_vocab_size(cfg.model, tokenizer_vocab)

    resume_path = resolve_resume(cfg, run_dir)
    resume_step, last_row = (
        check_checkpoint_matches(resume_path, cfg, vocab_size, base.reference if base else None)
        if resume_path
        else (None, None)
    )

    precision = resolve_precision(t.precision, t.accelerator)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    batch_args = {
        "seq_len": seq_len,
        "micro_batch_size": t.micro_batch_size,
        "global_batch_size": t.global_batch_size,
        "seed": cfg.seed,
        "max_steps": t.max_steps,
        "val_batches": t.val_batches,
        "loader_workers": cfg.data.loader_workers,
    }
    datamodule: Any
    label_names: list[str] | None = None
    if task == TaskName.pretrain:
        datamodule = TokenDataModule(dataset_dir=dataset_dir, **batch_args)
    else:
        from orchestra.data.tasks import TaskDataModule, resolve_task_paths

        train_path, val_path = resolve_task_paths(cfg.task, cfg.data.cache_dir)
        datamodule = TaskDataModule(cfg.task, train_path, val_path, tokenizer_json, eos_id, **batch_args)
        if task == TaskName.classification:
            label_names = datamodule.label_names
    module = build_module(
        cfg, vocab_size, tokenizer_json, precision, base=base, label_names=label_names, eos_id=eos_id
    )
    del base  # the module drops its reference once the weights are loaded

    # Pretraining rows are always full; fine-tuning batches are padded to their longest example, so
    # throughput counts their positions instead (and energy per token is not reported for them).
    tokens_per_step = t.global_batch_size * seq_len if task == TaskName.pretrain else None
    flops_model = model_flops_per_token(
        cfg.model,
        vocab_size,
        seq_len,
        weight_grads=method not in FROZEN_BASE_METHODS,
        lm_head=task != TaskName.classification,
    )
    throughput = ThroughputCallback(
        tokens_per_step,
        flops_model,
        t.log_every_n_steps,
        t.peak_flops,
        recompute_factor(cfg.strategy, cfg.model.n_layers),
    )
    energy = EnergyCallback(cfg.energy, run_dir / "emissions", tokens_per_step)
    last_val = _LastValidation()
    checkpointing = ModelCheckpoint(
        dirpath=run_dir / CHECKPOINT_DIRNAME,
        filename="step{step:07d}",
        auto_insert_metric_name=False,
        monitor="step",
        mode="max",
        save_top_k=t.keep_last_checkpoints,
        every_n_train_steps=t.ckpt_every_n_steps,
        save_last=True,
    )
    preemption = PreemptionCallback(
        run_dir / CHECKPOINT_DIRNAME, run_dir / MARKER_NAME, signals=(t.preempt_signal, "TERM")
    )
    callbacks: list[Callback] = [checkpointing, throughput, last_val, preemption]
    if method == FinetuneMethod.unfreeze:
        callbacks.append(GradualUnfreezing(cfg.model.n_layers, cfg.finetune.unfreeze_every_n_steps))
    if cfg.energy.enabled:
        callbacks.append(energy)
    if t.progress_bar:
        callbacks.append(RichProgressBar(leave=True))

    # Before the Trainer exists: rank from the launcher's environment (torchrun, srun, Lightning).
    is_zero = all(
        int(os.environ.get(k, "0")) == 0 for k in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK")
    )
    loggers = build_loggers(cfg.logger, run_dir, cfg.name, to_plain(cfg), resume_step, is_zero, last_row)
    trainer = L.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=build_strategy(cfg, precision),
        precision=lightning_precision(cfg, precision),
        max_steps=t.max_steps,
        max_epochs=-1,
        accumulate_grad_batches=accumulation,
        # DeepSpeed clips inside its engine (gradient_clipping in the generated config).
        gradient_clip_val=None if cfg.strategy.name.is_deepspeed else (t.grad_clip or None),
        val_check_interval=t.val_every_n_steps * accumulation,
        check_val_every_n_epoch=None,
        limit_val_batches=1.0,  # the val sampler fixes the set (trainer.val_batches micro-batches)
        num_sanity_val_steps=0,
        log_every_n_steps=t.log_every_n_steps,
        callbacks=callbacks,
        logger=loggers,
        plugins=[AtomicCheckpointIO(), *_slurm_plugins()],
        use_distributed_sampler=False,
        enable_progress_bar=t.progress_bar,
        enable_model_summary=False,
        default_root_dir=str(run_dir),
    )
    started = time.time()
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume_path) if resume_path else None)
    if preemption.preempted:
        # Checkpoint saved on a warning signal: leave at once with the status the batch script
        # requeues on (slurm/pretrain.sh); the rest of the run happens after the requeue.
        raise SystemExit(PREEMPTED_EXIT_CODE)
    newest = trainer.strategy.broadcast(find_resume_checkpoint(run_dir))
    if newest is None or checkpoint_step(Path(newest)) < trainer.global_step:
        # ModelCheckpoint defers the final save to a validation that never comes when max_steps is
        # not a multiple of val_every_n_steps: save the final state here (all ranks take part).
        trainer.save_checkpoint(run_dir / CHECKPOINT_DIRNAME / "last.ckpt")
        checkpointing.last_model_path = str(run_dir / CHECKPOINT_DIRNAME / "last.ckpt")
    if last_val.step != trainer.global_step:
        trainer.validate(module, datamodule=datamodule, verbose=False)
    metrics = {k: v.item() if torch.is_tensor(v) else v for k, v in trainer.callback_metrics.items()}
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and trainer.is_global_zero:
            logger.experiment.finish()  # Lightning leaves the W&B run open; the next job would reuse it

    sample = ""
    if task != TaskName.classification:  # a classifier has no language-model head to sample from
        sample = sample_text(
            module.model,
            tokenizer_json,
            t.sample_prompt,
            t.sample_tokens,
            eos_id,
            trainer.strategy.root_device,
            precision,
            cfg.seed,
        )
    summary: dict[str, Any] = {}
    if trainer.is_global_zero:
        perf = throughput.summary()
        last_ckpt = Path(checkpointing.last_model_path or checkpointing.best_model_path or "")
        steps = int(trainer.global_step)
        summary = {
            "steps": steps,
            # Fine-tuning: the positions counted in the measured windows (padding included).
            "tokens": steps * tokens_per_step if tokens_per_step else int(perf["tokens"] or 0),
            "train_loss": _metric(metrics, "train/loss"),
            "val_loss": _metric(metrics, "val/loss"),
            "val_ppl": _metric(metrics, "val/ppl"),
            "task": task.value,
            "finetune": method.value,
            "val_metrics": {k[4:]: _metric(metrics, k) for k in sorted(metrics) if k.startswith("val/")},
            "tokens_per_s": perf["tokens_per_s"],
            "mfu": perf["mfu"],
            "energy_kwh": energy.result["energy_kwh"],
            "co2_kg": energy.result["co2_kg"],
            "j_per_token": energy.result["j_per_token"],
            "checkpoint": str(last_ckpt) if last_ckpt.name else None,
            "resumed_from": str(resume_path) if resume_path else None,
            "wall_s": time.time() - started,
            "parameters": sum(p.numel() for p in module.model.parameters()),
            "trainable_parameters": sum(p.numel() for p in module.model.parameters() if p.requires_grad),
            "peak_mem_gb": (torch.cuda.max_memory_allocated() / 2**30) if torch.cuda.is_available() else None,
            "precision": precision,
            "strategy": cfg.strategy.name.value,
            "world_size": trainer.world_size,
            "run_dir": str(run_dir),
        }
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    return RunResult(summary=summary, sample=sample, run_dir=run_dir, module=module)
