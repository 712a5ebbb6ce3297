"""Sizing a training job before it is submitted: memory per rank, step time, token budget, verdict.

Everything here is arithmetic on the configuration: no model is built, no data is read, no
device is touched, so ``orchestra-plan`` answers on a login node in about a second, and the
batch script can refuse a layout that cannot fit before ``srun`` starts it. The parts:

- **GPUs** (:data:`GPUS`): memory, HBM / NVLink / network bandwidth and TDP of the parts a
  plan can be made for; dense peak FLOP/s come from :mod:`orchestra.train.flops`.
- **Memory per rank** (:func:`memory_plan`): parameters, gradients and optimizer states as each
  strategy keeps them (their byte counts follow what the code runs: FSDP2's fp32 shards and bf16
  gathers, DeepSpeed's own accounting, which :func:`deepspeed_model_states` reproduces), the
  gathered working set and buckets, activations per layer derived from the tensors a Llama block
  saves for backward (:func:`layer_activation_bytes`; Korthikanti et al.'s GPT formula,
  :func:`korthikanti_layer_bytes`, is kept as the published reference), the logits and loss, and
  a fixed CUDA/NCCL overhead.
- **Time** (:func:`step_time`): FLOPs per token (:func:`orchestra.train.flops.model_flops_per_token`)
  at a calibrated matmul efficiency, attention at a kernel-benchmark ratio to it, elementwise
  traffic over HBM bandwidth, communication over NVLink or the network with what overlap cannot
  hide, and a per-block framework overhead. Two constants are calibrated on published runs and the
  model is checked against others held out (:data:`ANCHORS`, :func:`anchor_results`).
- **Budget** (:func:`budget`): wall time, GPU-hours, energy and CO2 for a token budget.
- **Verdict** (:func:`plan_job`): fits or not, the largest term, and the fixes to try, each
  planned again with the change applied.

The layout reads ``strategy.tp``, ``strategy.cp`` and ``strategy.pp``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import Enum
from functools import cache
from pathlib import Path
from typing import Any

from orchestra.config import (
    ActivationCheckpointing,
    ConfigError,
    FinetuneMethod,
    KernelBackend,
    ModelConfig,
    PlanConfig,
    StrategyName,
    TaskName,
    TrainConfig,
    accumulation_steps,
    base_path,
    data_parallel_size,
    padded_vocab_size,
    require,
    validate,
)
from orchestra.model.config import Activation
from orchestra.model.peft.nf4 import NF4_BYTES
from orchestra.train.methods import method_spec
from orchestra.train.tasks import task_spec

GIB = 2**30
MIB = 2**20


# --------------------------------------------------------------------------------------------
# GPUs


@dataclass(frozen=True)
class GPU:
    """One accelerator a plan can be made for.

    Bandwidths are per GPU and per direction, in bytes/s: ``nvlink`` between the GPUs of a node
    (0 for parts without NVLink, whose peers talk over ``pcie``), ``network`` to other nodes
    (the NIC of a rail-optimised node, one per GPU). Peak FLOP/s are not repeated here: they are
    :data:`orchestra.train.flops.PEAK_FLOPS`' entry for ``device_name``.
    """

    key: str
    device_name: str
    """The name torch.cuda.get_device_name() and nvidia-smi report."""
    memory_mib: int
    """memory.total as nvidia-smi reports it."""
    hbm: float
    nvlink: float
    network: float
    pcie: float
    tdp_w: float
    family: str
    """Architecture whose calibrated efficiency applies (:data:`EFFICIENCY`)."""
    source: str

    @property
    def memory_bytes(self) -> float:
        return self.memory_mib * MIB

    @property
    def intra_node(self) -> float:
        """Bandwidth between two GPUs of one node: NVLink, else PCIe."""
        return self.nvlink or self.pcie

    def peak_flops(self, dtype: str) -> float:
        from orchestra.train.flops import device_peak_flops

        peak = device_peak_flops(self.device_name, dtype)
        if peak is None:
            raise ConfigError(
                f"plan.gpu: {self.key} has no published {dtype} peak (orchestra/train/flops.py)"
            )
        return peak


GB = 1e9
GPUS: dict[str, GPU] = {
    gpu.key: gpu
    for gpu in (
        # DGX H100: NVLink 4 (900 GB/s bidirectional per GPU), one 400 Gb/s ConnectX-7 per GPU,
        # HBM3 3.35 TB/s, PCIe Gen5, 700 W (NVIDIA H100 data sheet, DGX H100 user guide).
        GPU("h100-80gb", "NVIDIA H100 80GB HBM3", 81559, 3350 * GB, 450 * GB, 50 * GB, 64 * GB, 700,
            "hopper", "NVIDIA H100 SXM5 data sheet; DGX H100 (8 x 400 Gb/s NDR)"),
        # H200 SXM: the H100's compute with 141 GB HBM3e at 4.8 TB/s, same NVLink and TDP.
        GPU("h200-141gb", "NVIDIA H200", 143771, 4800 * GB, 450 * GB, 50 * GB, 64 * GB, 700,
            "hopper", "NVIDIA H200 data sheet; HGX H200 (8 x 400 Gb/s NDR)"),
        # DGX A100: NVLink 3 (600 GB/s bidirectional), one 200 Gb/s HDR NIC per GPU, 400 W.
        GPU("a100-80gb", "NVIDIA A100-SXM4-80GB", 81920, 2039 * GB, 300 * GB, 25 * GB, 32 * GB, 400,
            "ampere", "NVIDIA A100 data sheet (SXM4 80GB); DGX A100 (8 x 200 Gb/s HDR)"),
        GPU("a100-40gb", "NVIDIA A100-SXM4-40GB", 40960, 1555 * GB, 300 * GB, 25 * GB, 32 * GB, 400,
            "ampere", "NVIDIA A100 data sheet (SXM4 40GB); DGX A100 (8 x 200 Gb/s HDR)"),
        # L40S: GDDR6 864 GB/s, no NVLink (PCIe Gen4 x16 between GPUs), 350 W; servers carry
        # about one 100 Gb/s port per GPU.
        GPU("l40s", "NVIDIA L40S", 46068, 864 * GB, 0.0, 12.5 * GB, 32 * GB, 350,
            "ada", "NVIDIA L40S data sheet; PCIe Gen4 x16, 100 Gb/s per GPU"),
    )
}  # fmt: skip


def gpu_by_name(name: str) -> GPU:
    """A GPU by its key (h100-80gb) or by the device name nvidia-smi prints; ConfigError naming plan.gpu."""
    if name in GPUS:
        return GPUS[name]
    lowered = name.strip().lower()
    for gpu in GPUS.values():
        if gpu.device_name.lower() == lowered:
            return gpu
    raise ConfigError(f"plan.gpu: unknown GPU {name!r}; choose one of {', '.join(GPUS)} (or auto)")


def detect_gpu(query: Callable[[], str] | None = None) -> GPU:
    """The local GPU from nvidia-smi's name and memory (no CUDA context is created)."""
    import subprocess

    def nvidia_smi() -> str:
        return subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout

    try:
        text = (query or nvidia_smi)()
    except (OSError, subprocess.SubprocessError) as err:
        raise ConfigError(
            f"plan.gpu=auto: no NVIDIA GPU found ({err}); name one of {', '.join(GPUS)}"
        ) from None
    first = text.strip().splitlines()[0] if text.strip() else ""
    name, _, memory = first.rpartition(",")
    name = name.strip()
    try:
        mib = float(memory)
    except ValueError:
        raise ConfigError(f"plan.gpu=auto: cannot read nvidia-smi's answer {first!r}") from None
    words = name.lower().replace("-", " ").split()
    matches = [gpu for gpu in GPUS.values() if gpu.device_name.lower().replace("-", " ").split()[1] in words]
    if not matches:
        raise ConfigError(f"plan.gpu=auto: {name!r} is not in the table; name one of {', '.join(GPUS)}")
    return min(matches, key=lambda gpu: abs(gpu.memory_mib - mib))


# --------------------------------------------------------------------------------------------
# Parameters


@dataclass(frozen=True)
class ParamCounts:
    """Parameters of one model, split the ways the strategies split them.

    ``split`` parts are divided by tensor parallelism (q/k/v/gate/up by columns with their biases,
    o/down by rows, embedding rows and lm-head columns over the vocabulary); ``replicated`` parts
    are not (norm gains, the biases of row-split layers). The root is what FSDP2 wraps last: the
    embeddings, the final norm and the lm head (``lm_head`` is 0 when it is the embedding).
    """

    block_split: int
    block_replicated: int
    n_layers: int
    embedding: int
    lm_head: int
    norm: int
    largest_module: int
    """The most parameters one module holds itself (DeepSpeed's "largest layer")."""

    @property
    def block(self) -> int:
        return self.block_split + self.block_replicated

    @property
    def blocks(self) -> int:
        return self.n_layers * self.block

    @property
    def root(self) -> int:
        return self.embedding + self.lm_head + self.norm

    @property
    def total(self) -> int:
        return self.blocks + self.root

    def block_per_rank(self, tp: int = 1) -> float:
        return self.block_split / tp + self.block_replicated

    def root_per_rank(self, tp: int = 1, pp: int = 1) -> float:
        """The root's share of one rank: with pipeline stages, one end's (the vocabulary matrix and a norm)."""
        if pp > 1:
            return self.embedding / tp + self.norm
        return (self.embedding + self.lm_head) / tp + self.norm

    def per_rank(self, tp: int = 1, pp: int = 1) -> float:
        """Parameters one rank holds before any data-parallel sharding (its stage's blocks and root part)."""
        return self.n_layers * self.block_per_rank(tp) / pp + self.root_per_rank(tp, pp)


def param_counts(m: ModelConfig, vocab: int) -> ParamCounts:
    """Parameter counts of the decoder ``transformer.py`` builds for ``m`` (biases, q/k and sandwich norms included)."""
    h, q, kv, f = m.dim, m.n_heads * m.head_size, m.n_kv_heads * m.head_size, m.ffn_dim
    split = h * q + 2 * h * kv + q * h + 3 * h * f
    split += (q + 2 * kv) if m.qkv_bias else 0
    split += 2 * f if m.mlp_bias else 0
    replicated = 2 * h + (2 * h if m.sandwich_norm else 0) + (2 * m.head_size if m.qk_norm else 0)
    replicated += h if m.o_bias else 0
    replicated += h if m.mlp_bias else 0
    largest = max(
        vocab * h,
        h * f + (f if m.mlp_bias else 0),
        h * q + (q if m.qkv_bias else 0),
        q * h + (h if m.o_bias else 0),
    )
    lm_head = 0 if m.tie_embeddings else vocab * h
    return ParamCounts(split, replicated, m.n_layers, vocab * h, lm_head, h, largest)


def parameter_count(m: ModelConfig, vocab: int) -> int:
    """All parameters of the model (a tied embedding counted once)."""
    return param_counts(m, vocab).total


def trainable_parameters(cfg: TrainConfig, counts: ParamCounts) -> int:
    """Parameters that get gradients and optimizer state: all of them, or a frozen base's method weights.

    LoRA and QLoRA: rank x (in + out) per targeted projection, DoRA one magnitude per output row
    more; adapters: two bottleneck MLPs per block (orchestra/model/peft/adapter.py); prompt tuning:
    the virtual tokens' embeddings.
    """
    f, m = cfg.finetune, cfg.model
    if f.method in (FinetuneMethod.lora, FinetuneMethod.dora, FinetuneMethod.qlora):
        h, q, kv, ffn = m.dim, m.n_heads * m.head_size, m.n_kv_heads * m.head_size, m.ffn_dim
        shapes = {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, ffn),
            "up_proj": (h, ffn),
            "down_proj": (ffn, h),
        }
        names = set(shapes) if "all-linear" in f.lora_targets else {t.split(".")[-1] for t in f.lora_targets}
        per_layer = sum(f.lora_rank * (i + o) for name, (i, o) in shapes.items() if name in names)
        if f.method == FinetuneMethod.dora:
            per_layer += sum(o for name, (_, o) in shapes.items() if name in names)
        return m.n_layers * per_layer
    if f.method == FinetuneMethod.adapter:
        b = f.adapter_bottleneck
        return m.n_layers * 2 * (2 * m.dim * b + b + m.dim)
    if f.method == FinetuneMethod.prompt:
        return f.prompt_tokens * m.dim
    return counts.total


# --------------------------------------------------------------------------------------------
# Numerics: bytes per parameter and per activation element, by strategy and precision


@dataclass(frozen=True)
class Numerics:
    """Bytes per parameter each state takes, and the dtypes activations are saved in.

    ``gathered`` is the dtype FSDP2 / ZeRO-3 gather a block in for compute; ``residual`` the
    residual stream's (fp32 under autocast, whose matmuls still run in bf16: ``compute``).
    ``autocast`` marks the runs whose forward keeps a bf16 cast of every weight for backward.
    """

    param: int
    grad: int
    optimizer: int
    gathered: int
    compute: int
    residual: int
    autocast: bool
    master: int = 0
    """DeepSpeed: an fp32 master copy besides the bf16 weights (and its fp32 gradient partition)."""


def resolve_precision(precision: str, accelerator: str) -> str:
    """trainer.precision=auto as a GPU run resolves it (bf16-mixed); fp32 on a CPU run."""
    if precision != "auto":
        return precision
    return "32-true" if accelerator == "cpu" else "bf16-mixed"


def numerics(strategy: StrategyName, precision: str) -> Numerics:
    """The byte counts the strategy and precision train with (orchestra/train/strategy.py).

    - 32-true: fp32 everywhere (AdamW moments 8 bytes per parameter).
    - single/ddp with bf16-mixed or 16-mixed: Lightning's autocast over fp32 weights, gradients and
      moments (16 bytes per parameter); activations in the matmuls' 16-bit dtype.
    - bf16-true (single/ddp): weights, gradients and torch AdamW's moments in bf16 (8 bytes).
    - fsdp with bf16: fp32 shards (parameters, gradients reduced in fp32, moments), gathered in
      bf16 by FSDP2's MixedPrecisionPolicy; activations and the residual stream in bf16.
    - deepspeed with bf16: bf16 weights and gradients, an fp32 master copy, its fp32 gradient
      partition and the moments (DeepSpeed's own accounting, stage_1_and_2.py / stage3.py).
    """
    bf16 = precision.startswith("bf16")
    half = bf16 or precision.startswith("16")
    if not half:
        return Numerics(4, 4, 8, 4, 4, 4, False)
    if strategy.is_deepspeed:
        return Numerics(2, 2, 8, 2, 2, 2, False, master=4)
    if strategy == StrategyName.fsdp and bf16:
        return Numerics(4, 4, 8, 2, 2, 2, False)
    if precision == "bf16-true":
        return Numerics(2, 2, 4, 2, 2, 2, False)
    return Numerics(4, 4, 8, 4, 2, 4, True)


# --------------------------------------------------------------------------------------------
# Layout


@dataclass(frozen=True)
class Layout:
    """How the ranks of a job split the model and the batch.

    ``tp`` is the tensor-parallel degree inside a node, ``cp`` the context-parallel one (each rank
    holds 1/cp of every row), ``pp`` the number of pipeline ranks (strategy.pp). The
    rest of the world is data parallel; FSDP shards the states over the data and context ranks
    (what strategy.py's mesh flattens), ZeRO over the data ranks (HSDP: over one node's ranks).
    """

    strategy: StrategyName
    devices: int
    nodes: int = 1
    tp: int = 1
    pp: int = 1
    cp: int = 1
    hybrid_shard: bool = False
    reshard_after_forward: bool = True
    cpu_offload: bool = False
    gradient_as_bucket_view: bool = True
    overlap_comm: bool = True
    reduce_bucket_size: int = 500_000_000

    @property
    def world(self) -> int:
        return self.devices * self.nodes

    @property
    def dp(self) -> int:
        return max(1, self.world // (self.tp * self.pp * self.cp))

    @property
    def shard(self) -> int:
        """Ranks the sharded states are split over (1: every rank keeps them whole)."""
        if self.strategy in (StrategyName.single, StrategyName.ddp):
            return 1
        if self.strategy == StrategyName.fsdp and self.hybrid_shard:
            return max(1, self.devices // (self.tp * self.pp * self.cp))
        if self.strategy == StrategyName.fsdp:
            return self.dp * self.cp
        return self.dp

    def check(self) -> None:
        """Every split even; a ConfigError naming the key otherwise."""
        model_parallel = self.tp * self.pp * self.cp
        require(
            self.world % model_parallel == 0,
            "strategy.tp",
            f"tp x pp x cp = {model_parallel} does not divide the world size trainer.devices x "
            f"trainer.num_nodes = {self.world}",
        )
        require(
            self.tp <= self.devices,
            "strategy.tp",
            f"{self.tp} exceeds trainer.devices={self.devices}: a tensor-parallel group stays in one node",
        )


def layout_of(cfg: TrainConfig) -> Layout:
    st, t = cfg.strategy, cfg.trainer
    return Layout(
        strategy=st.name,
        devices=t.devices,
        nodes=t.num_nodes,
        tp=st.tp,
        pp=st.pp,
        cp=st.cp,
        hybrid_shard=st.hybrid_shard,
        reshard_after_forward=st.reshard_after_forward,
        cpu_offload=st.cpu_offload,
        gradient_as_bucket_view=st.gradient_as_bucket_view,
        overlap_comm=st.overlap_comm,
        reduce_bucket_size=st.reduce_bucket_size,
    )


# --------------------------------------------------------------------------------------------
# Model states per rank


@dataclass(frozen=True)
class States:
    """Bytes of one rank's model states, and what offloading moves to its node's CPU memory."""

    parameters: float
    gradients: float
    optimizer: float
    working: float
    """Gathered parameters and gradient buckets that exist only while a step runs."""
    working_note: str
    host_per_node: float = 0.0


def deepspeed_model_states(
    params: float, largest_module: float, stage: int, gpus: int, *, offload: bool = False
) -> float:
    """GPU bytes of DeepSpeed's model states per rank for bf16 training, as DeepSpeed itself counts them.

    Stage 2: 2P (bf16 weights) + 18P/N (bf16 and fp32 gradient partitions, fp32 master copy,
    Adam moments); stage 3: 18P/N + 4 x the largest module (its gathered bf16 weights and
    gradients); stage 3 with parameters and optimizer offloaded: the largest module only
    (estimate_zero2/zero3_model_states_mem_needs). Stage 1 keeps the full bf16 gradients as well:
    4P + 16P/N. Without gradient buckets, which :func:`state_memory` adds.
    """
    if stage == 1:
        return 4 * params + 16 * params / gpus
    if stage == 2:
        return 2 * params + 18 * params / gpus
    if offload:
        return 4 * largest_module
    return 18 * params / gpus + 4 * largest_module


def model_state_bytes(params: float, strategy: str, n: int, largest_module: float = 0.0) -> float:
    """Parameters + gradients + optimizer states per rank for mixed-precision AdamW on ``n`` ranks.

    single/ddp 16P (fp32 weights, gradients, moments), FSDP2 16P/N (fp32 shards, bf16 gathers),
    DeepSpeed ZeRO as :func:`deepspeed_model_states` counts it.
    """
    name = StrategyName(strategy)
    if name in (StrategyName.single, StrategyName.ddp):
        return 16 * params
    if name == StrategyName.fsdp:
        return 16 * params / n
    return deepspeed_model_states(
        params, largest_module, name.zero_stage, n, offload=name == StrategyName.deepspeed_zero3_offload
    )


def state_memory(
    counts: ParamCounts,
    layout: Layout,
    num: Numerics,
    trainable: float | None = None,
    reference: bool = False,
    nf4: float = 0.0,
) -> States:
    """Parameters, gradients, optimizer states and working buffers of one rank.

    ``trainable`` parameters (default: all) get gradients and AdamW state; a frozen base keeps
    only its weights. ``reference`` adds a frozen copy of the weights (DPO with full fine-tuning).
    ``nf4`` of the frozen weights are stored in NF4 (finetune=qlora, one device) at NF4_BYTES each.
    FSDP2's working set is the unsharded root (never resharded between forward and backward),
    two gathered blocks (the current and the prefetched one; every block with
    ``reshard_after_forward=false``) and one block's unsharded gradients in bf16 and in the fp32
    reduce dtype. ZeRO-1/2 add their gradient buckets (two with ``overlap_comm``), ZeRO-3 one
    bucket and the gathered largest module.
    """
    tp, pp, n = layout.tp, layout.pp, layout.shard
    p = counts.per_rank(tp, pp)
    t = p if trainable is None else min(p, trainable / (tp * pp))
    st = layout.strategy
    ref = p * num.param if reference else 0.0
    if st in (StrategyName.single, StrategyName.ddp):
        working, note = 0.0, ""
        if st == StrategyName.ddp and not layout.gradient_as_bucket_view:
            working, note = t * num.grad, "DDP gradient buckets (strategy.gradient_as_bucket_view=false)"
        weights = (p - nf4) * num.param + nf4 * NF4_BYTES
        return States(weights + ref, t * num.grad, t * num.optimizer, working, note)
    if st == StrategyName.fsdp:
        block, g = counts.block_per_rank(tp), num.gathered
        gathered_blocks = 2 if layout.reshard_after_forward else counts.n_layers // pp
        grad_buffers = block * (g + num.grad) if t > 0.5 * p else 0.0
        working = counts.root_per_rank(tp, pp) * g + gathered_blocks * block * g + grad_buffers
        note = f"unsharded root + {gathered_blocks} gathered blocks + one block's gradients"
        params, grads, opt = (p * num.param + ref) / n, t * num.grad / n, t * num.optimizer / n
        if layout.cpu_offload:
            host = (params + grads + opt) * min(layout.devices, layout.world)
            return States(0.0, 0.0, 0.0, working, note + "; states offloaded to CPU", host)
        return States(params, grads, opt, working, note)
    # DeepSpeed: bf16 weights and gradients, fp32 master copy + its gradient partition, moments.
    master_grad = t * num.master / n
    optimizer = t * (num.master + num.optimizer) / n
    bucket = layout.reduce_bucket_size * num.grad
    if st.zero_stage == 1:
        buckets = bucket * (2 if layout.overlap_comm else 1)
        return States(p * num.param + ref, t * num.grad + master_grad, optimizer, buckets, "gradient buckets")
    if st.zero_stage == 2:
        buckets = bucket * (2 if layout.overlap_comm else 1)
        return States(
            p * num.param + ref, t * num.grad / n + master_grad, optimizer, buckets, "gradient buckets"
        )
    gathered = 2 * counts.largest_module * num.gathered
    working = gathered + bucket
    note = "gathered largest module (weights + gradients) + gradient bucket"
    params = (p * num.param + ref) / n
    if st == StrategyName.deepspeed_zero3_offload:
        host = (params + master_grad + optimizer) * min(layout.devices, layout.world)
        return States(0.0, 0.0, 0.0, working, note + "; states offloaded to CPU", host)
    return States(params, master_grad, optimizer, working, note)


# --------------------------------------------------------------------------------------------
# Activations


def korthikanti_layer_bytes(
    seq: int,
    micro_batch: int,
    dim: int,
    heads: int,
    *,
    flash: bool = False,
    tp: int = 1,
    sequence_parallel: bool = True,
    recompute: bool = False,
) -> float:
    """Activation bytes of one GPT layer in 16-bit, Korthikanti et al. 2022 ("Reducing Activation
    Recomputation in Large Transformer Models", section 4).

    s·b·h·(34 + 5·a·s/h) without parallelism; tensor parallelism divides the 24 bytes inside the
    sublayers and the 5as/h scores by t (10 + 24/t + 5as/(ht)), sequence parallelism the 10 left
    over as well (34/t + 5as/(ht)); flash attention never stores the scores (the 5as/h term
    vanishes); full recomputation keeps only the layer input, 2sbh (/t with sequence parallelism).
    The GPT block it counts (a 4h GELU MLP, LayerNorm, dropout masks) is not a Llama block, so the
    plan uses :func:`layer_activation_bytes`; this is the published reference it is compared with.
    """
    s, b, h, a, t = seq, micro_batch, dim, heads, tp
    sbh = s * b * h
    if recompute:
        return 2 * sbh / (t if sequence_parallel else 1)
    scores = 0.0 if flash else 5 * a * s / (h * t)
    if t == 1:
        return sbh * (34 + scores)
    if sequence_parallel:
        return sbh * (34 / t + scores)
    return sbh * (10 + 24 / t + scores)


@dataclass(frozen=True)
class Kernels:
    """Which implementation of the fusable ops runs (orchestra/model/ops.py).

    On CUDA, model.kernels=auto|triton runs the Triton RMSNorm, RoPE and SwiGLU and the fused
    linear cross-entropy, except the variants the Triton table leaves to torch (ops.VARIANTS:
    offset norms, GeGLU, soft-capped logits) and tensors that are DTensors (tensor parallelism's
    norms and loss). strategy.compile fuses the elementwise ops as well (for time, not memory).
    """

    norm: bool
    activation: bool
    loss: bool
    elementwise: bool
    """Elementwise traffic as fused kernels move it (Triton or compiled), for the time model."""
    on_gpu: bool = False
    """The run trains on CUDA, where model.attention=auto takes FlexAttention for masked rows."""


def kernels_of(cfg: TrainConfig, tp: int = 1) -> Kernels:
    m = cfg.model
    on_gpu = cfg.trainer.accelerator != "cpu"
    triton = on_gpu and m.kernels in (KernelBackend.auto, KernelBackend.triton)
    norm = triton and not m.norm_offset and tp == 1
    activation = triton and Activation(m.activation) == Activation.silu
    loss = triton and m.final_softcap is None and tp == 1
    return Kernels(norm, activation, loss, triton or cfg.strategy.compile, on_gpu)


def attention_path(m: ModelConfig, layer: int, seq: int, on_gpu: bool, packed: bool, cp: int = 1) -> str:
    """How block ``layer``'s attention runs in training, as transformer.py decides it.

    "flex" (FlexAttention: q, k, v, output and a log-sum-exp kept), "eager" (soft-capped scores
    written out), "repeat" (SDPA on key/value heads copied to the query heads) or "gqa" (SDPA
    reading the grouped heads in place).
    """
    from orchestra.model.config import AttentionImpl

    impl = AttentionImpl(m.attention)
    window = m.sliding_window
    needs_mask = packed or (window is not None and window < seq) or m.attn_softcap is not None
    if impl == AttentionImpl.flex or (impl == AttentionImpl.auto and on_gpu and needs_mask):
        return "flex"
    if m.attn_softcap is not None:
        return "eager"
    dense = packed or (m.is_windowed(layer) and window is not None and window < seq)
    grouped = m.n_heads != m.n_kv_heads
    # Context parallelism repeats the gathered heads for its dense mask (context_parallel.py).
    if grouped and (impl == AttentionImpl.repeat_kv or (dense and on_gpu) or cp > 1):
        return "repeat"
    return "gqa"


def layer_activation_bytes(
    m: ModelConfig,
    layer: int,
    seq: int,
    micro_batch: int,
    num: Numerics,
    kernels: Kernels,
    *,
    tp: int = 1,
    cp: int = 1,
    packed: bool = False,
) -> float:
    """Bytes decoder block ``layer`` saves for backward over one micro-batch (its ops, transformer.py).

    Per token, with c the compute dtype's bytes and r the residual stream's:

    - each RMSNorm: the torch reference keeps an fp32 copy of its input, the fp32 1/rms and the
      normalised input in the input dtype ((4 + r)h + 4; the Triton kernel keeps the input and
      1/rms, rh + 4), plus its output as the next linears save it: ch when r = c, a cast per
      consumer under autocast (3ch before q/k/v, 2ch before gate/up); under tensor parallelism
      the norm runs on a sequence shard (/tp) and its output is gathered whole (ch);
    - attention: q after RoPE, k and v as SDPA or FlexAttention receives them (the key/value
      heads, or copies for each query head where :func:`attention_path` repeats them), the output
      (o_proj's input is a view of it: flash and memory-efficient attention lay it out
      [B, T, H, hd]): c(2q + 2kv), or 4cq repeated, for q = n_heads x head_dim and kv =
      n_kv_heads x head_dim, plus an fp32 log-sum-exp per head; the torch RoPE keeps its two tables in c bytes
      per layer. Soft-capped attention (Gemma 2) runs eagerly and keeps tanh, fp32 softmax and bf16
      probabilities, (2c + 4) bytes per head and key, and its bool mask; a windowed layer's
      explicit mask is kept by SDPA as a c-byte [T, S] tensor (per row with packed examples);
    - SwiGLU: gate, up, silu(gate) and the product (4cf; the Triton kernel recomputes silu: 3cf).

    That is 16h + 4q + 4kv + 8f (+ 4 n_heads + 8) bytes per token in bf16 with the torch ops
    (8h + 4q + 4kv + 6f with the Triton ones), against the 34h Korthikanti et al. count for a GPT block.
    """
    h, hd = m.dim, m.head_size
    q, kv, f = m.n_heads * hd, m.n_kv_heads * hd, m.ffn_dim
    c, r = num.compute, num.residual
    tokens = micro_batch * seq / cp
    fused_norm = kernels.norm and tp == 1

    def norm(consumers: int) -> float:
        kept = ((r if fused_norm else (8 if m.norm_offset else 4 + r)) * h + 4) / tp
        if tp > 1 or r == c:
            return kept + c * h
        return kept + consumers * c * h

    per_token = norm(3) + norm(2)
    if m.sandwich_norm:  # post-norms of the sublayer outputs (torch: fp32 copy + normalised copy)
        per_token += 2 * ((8 if m.norm_offset else 4 + c) * h + 4) / tp
    if m.qk_norm:
        per_token += ((c if kernels.norm else 4 + c) * (q + kv) + 8 * m.n_heads) / tp
    path = attention_path(m, layer, seq, kernels.on_gpu, packed, cp)
    repeated = q if path in ("repeat", "eager") else kv
    keys = seq / cp
    if path != "eager":
        # Under context parallelism SDPA keeps the group's gathered keys and values: cp times the
        # local rows' (context_parallel.py).
        attention: float = c * (q + 2 * repeated * cp + q) + 4 * m.n_heads
    else:  # eager: q, k, v for the two matmuls, tanh, fp32 softmax, bf16 probabilities, the output copy
        attention = c * (q + 2 * repeated + q) + (2 * c + 4) * m.n_heads * keys
    per_token += attention / tp
    per_token += (3 if kernels.activation else 4) * c * f / tp
    total = tokens * per_token
    if not kernels.elementwise or tp > 1:  # the torch RoPE's cos/sin casts
        total += 2 * c * (seq / cp) * hd
    window = m.sliding_window if m.is_windowed(layer) else None
    rows = micro_batch if packed else 1
    if cp > 1 and layer == 0:  # one bool mask of local queries against every key, shared by the blocks
        total += (seq / cp) * seq
    if path == "eager":
        total += rows * (seq / cp) * keys  # the bool mask masked_fill keeps
    elif path != "flex" and ((window is not None and window < seq) or packed):
        total += c * rows * (seq / cp) * keys  # FlexAttention's block masks are per tile: negligible
    return total


@dataclass(frozen=True)
class Activations:
    """Activation bytes of one rank at the start of backward, when they peak."""

    layers: float
    """Every block's saved tensors (checkpointed blocks: their inputs) and the final norm's."""
    recompute: float
    """One checkpointed block recomputed in backward (0 without checkpointing)."""
    logits: float
    """Logits and loss: the torch path's fp32 log-probabilities and gradients, or the fused kernel's buffers."""
    autocast: float
    """bf16 casts of the weights that autocast keeps for backward (single/ddp with bf16-mixed)."""

    @property
    def total(self) -> float:
        return self.layers + self.recompute + self.logits + self.autocast


def checkpointed_layers(mode: ActivationCheckpointing, every_k: int, n_layers: int) -> list[bool]:
    """Which blocks strategy.parallelize wraps for recomputation (full: all; every_k: i % k == 0)."""
    if mode == ActivationCheckpointing.none:
        return [False] * n_layers
    if mode == ActivationCheckpointing.full:
        return [True] * n_layers
    return [i % every_k == 0 for i in range(n_layers)]


def logits_bytes(
    tokens: float,
    vocab: int,
    dim: int,
    num: Numerics,
    kernels: Kernels,
    *,
    tp: int = 1,
    softcap: bool = False,
) -> float:
    """Bytes the loss holds at its peak.

    The torch path (ops.torch_linear_cross_entropy, and loss_parallel under tensor parallelism,
    vocabulary split by tp) keeps the fp32 log-probabilities for backward and, in backward,
    their gradient and the gradient of the fp32 logits: 12 bytes per token and vocabulary entry
    (+4 for the tanh of soft-capped logits); the compute-dtype logits and their fp32 copy of the
    forward are gone by then. The fused kernel never holds [tokens, vocab]: it keeps the gradients
    of the hidden states and of the weight and one chunk of logits (about twice the hidden states,
    kernels/linear_cross_entropy.py's default_chunk_size).
    """
    if kernels.loss and tp == 1:
        r = num.residual
        chunk = min(4096, max(256, 2 ** math.ceil(math.log2(max(1.0, 2 * tokens * dim / vocab)))), tokens)
        return tokens * dim * r + vocab * dim * num.gathered + chunk * vocab * r
    return tokens * vocab / tp * (12 + (4 if softcap else 0))


def activation_memory(
    m: ModelConfig,
    vocab: int,
    seq: int,
    micro_batch: int,
    num: Numerics,
    kernels: Kernels,
    checkpointing: ActivationCheckpointing = ActivationCheckpointing.none,
    every_k: int = 2,
    *,
    tp: int = 1,
    pp: int = 1,
    cp: int = 1,
    packed: bool = False,
    lm_head: bool = True,
) -> Activations:
    """Activations of one rank: saved tensors of every block, recompute working set, loss, weight casts.

    A checkpointed block keeps only its input (r bytes per token and dim, split by tp under
    sequence parallelism); in backward one such block at a time is recomputed in full. With
    pipeline stages, 1F1B keeps pp micro-batches of L/pp blocks in flight on the first stage:
    the same bytes as all L blocks of one micro-batch, so pp changes nothing here.
    """
    tokens = micro_batch * seq / cp
    wrapped = checkpointed_layers(checkpointing, every_k, m.n_layers)
    full = [
        layer_activation_bytes(m, i, seq, micro_batch, num, kernels, tp=tp, cp=cp, packed=packed)
        for i in range(m.n_layers)
    ]
    block_input = tokens * m.dim * num.residual / tp
    layers = sum(block_input if w else a for a, w in zip(full, wrapped, strict=True))
    recompute = max((a for a, w in zip(full, wrapped, strict=True) if w), default=0.0)
    kept = num.residual if kernels.norm and tp == 1 else (8 if m.norm_offset else 4 + num.residual)
    final_norm = tokens * ((kept * m.dim + 4) / tp + m.dim * num.compute) + tokens * 8  # + token ids
    logits = (
        logits_bytes(tokens, vocab, m.dim, num, kernels, tp=tp, softcap=m.final_softcap is not None)
        if lm_head
        else 0.0
    )
    autocast = 0.0
    if num.autocast:
        h, q, kv, f = m.dim, m.n_heads * m.head_size, m.n_kv_heads * m.head_size, m.ffn_dim
        block = h * q + 2 * h * kv + q * h + 3 * h * f
        kept = sum(1 for w in wrapped if not w) + (1 if any(wrapped) else 0)
        autocast = num.compute * (kept * block + (0 if kernels.loss or not lm_head else vocab * h))
    return Activations(layers + final_norm, recompute, logits, autocast)


# --------------------------------------------------------------------------------------------
# Time


ELEMENTWISE_BANDWIDTH = 0.8
"""Share of HBM bandwidth elementwise kernels reach (norms, activations, residual adds, casts)."""
HBM_PASSES_PER_COMM_BYTE = 2.5
"""HBM reads and writes per byte an NCCL ring moves (all-gather: 2, reduce-scatter: 3): the
memory traffic that overlapped communication steals from the kernels it runs beside."""
LOSS_BYTES_PER_LOGIT = {True: 10.0, False: 46.0}
"""HBM bytes per token and vocabulary entry of the loss: the fused kernel writes and reads a bf16
logits chunk a few times (10); the torch path writes bf16 logits, an fp32 copy, two-pass
log-softmax and its backward (46)."""
FP8_CAST_BYTES = 7.0
"""Per element of a linear's input and of its output gradient under tensorwise Float8: amax read
(2), scaled cast (2 read + 1 written) and the transposed copy for the weight gradient (2)."""


def elementwise_bytes(m: ModelConfig, fused: bool, tp: int = 1) -> float:
    """HBM bytes one block's elementwise ops move per token, forward; backward moves about twice that.

    Counted op by op on the Llama block: fused (Triton or compiled) norms read and write the
    row once (4h bytes each in bf16), RoPE q and k (4(q + kv)), SwiGLU gate and up in, product
    out (6f); the torch ops upcast and write intermediates (36h per norm, 20(q + kv) for RoPE, 10f
    for SwiGLU), and add two residuals (12h); attention that repeats k/v to the query heads
    (:func:`attention_path`) copies them too (4(q + kv) with GQA), counted where it does. Tensor parallelism splits all of it but the residual stream's share (the norms run on
    a sequence shard, so that is split too).
    """
    h, q, kv, f = m.dim, m.n_heads * m.head_size, m.n_kv_heads * m.head_size, m.ffn_dim
    if fused:
        norms, rope, act = 2 * 4 * h, 4 * (q + kv), 6 * f
    else:
        norms, rope, act = 2 * 36 * h, 20 * (q + kv), 10 * f
    # The time model is for GPU runs of full rows (pretraining's).
    repeats = attention_path(m, 0, m.max_seq_len, on_gpu=True, packed=False) == "repeat"
    repeat = 4 * (q + kv) if repeats else 0
    return (norms + rope + act + repeat + 12 * h) / tp


@dataclass(frozen=True)
class Efficiency:
    """How close one architecture's kernels come to its peak, and where that number comes from."""

    family: str
    matmul: float
    """Share of peak the dense matmuls reach in training (calibrated on published runs)."""
    attention: float
    """Attention FLOP/s over matmul FLOP/s, in model-FLOPs units (the causal T x T counted whole,
    as flops.attention_keys does), from the FlashAttention-2/3 papers' fwd+bwd benchmarks."""
    calibrated_on: str


ATTENTION_RATIO = {"hopper": 0.765, "ampere": 1.47}
"""FlashAttention-2 fwd+bwd, causal, head dim 128, runs at about 280 TFLOP/s on an H100 SXM
(FlashAttention-3 paper's FA2 curves, 2k-8k tokens) and 190 on an A100 (FlashAttention-2 paper);
those papers count a causal score matrix as half, so in model-FLOPs units that is
2 x 280 / 989 = 0.57 and 2 x 190 / 312 = 1.22 of peak, against about 0.74 and 0.83 of peak for
large bf16 GEMMs: ratios 0.765 and 1.47."""
FAMILY_BORROWS = {"ada": "ampere", "hopper": "hopper", "ampere": "ampere"}
"""Architectures without published anchors use the nearest calibrated one's efficiency."""


class Recompute(str, Enum):
    """What backward recomputes: nothing, whole blocks, or torchtitan's selective policy
    (every other matmul of a block, never attention) for the anchors that used it."""

    none = "none"
    full = "full"
    selective = "selective"


@dataclass(frozen=True)
class Workload:
    """One training step as the time model sees it: shapes, layout and what runs how."""

    model: ModelConfig
    vocab: int
    seq: int
    micro_batch: int
    """Rows per forward on one data-parallel rank."""
    accumulation: int
    layout: Layout
    precision: str = "bf16-mixed"
    fused: bool = True
    """Elementwise ops fused (Triton kernels or torch.compile)."""
    fused_loss: bool = True
    recompute: Recompute = Recompute.none
    recomputed_blocks: float = 0.0
    """Share of the blocks recomputed (full: 1; every_k: ceil(L/k)/L)."""
    fp8: bool = False
    """Float8 matmuls in the blocks' linears (2x the bf16 peak) and all-gathers of their weights."""
    weight_grads: bool = True
    lm_head: bool = True
    reference_forward: bool = False
    """DPO: a frozen reference model runs one more forward."""
    reduce_bytes: int = 4
    """Bytes per gradient element FSDP reduces in (fp32 reduce dtype)."""
    hbm: float | None = None
    """HBM bandwidth of the part actually used, when it differs from the table's (bytes/s)."""


@dataclass(frozen=True)
class StepTime:
    """Seconds of one optimizer step and the throughput they give."""

    compute_s: float
    """Matmuls, attention and elementwise traffic of every micro-batch (recompute included)."""
    communication_s: float
    """Collectives' transfer time, overlapped or not."""
    exposed_s: float
    """What communication adds to the step: contention while overlapped, the part compute cannot
    hide, tensor-parallel collectives on the critical path, the optimizer's all-gather."""
    overhead_s: float
    """Framework overhead per block and micro-batch (launches, hooks)."""
    optimizer_s: float
    step_s: float
    tokens_per_step: float
    model_flops_per_token: float
    peak_flops: float
    world: int

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.step_s

    @property
    def tokens_per_s_per_gpu(self) -> float:
        return self.tokens_per_s / self.world

    @property
    def mfu(self) -> float:
        return self.tokens_per_s_per_gpu * self.model_flops_per_token / self.peak_flops


def step_time(
    w: Workload, gpu: GPU, efficiency: Efficiency | None = None, overhead_s: float | None = None
) -> StepTime:
    """Seconds per optimizer step for workload ``w`` on ``gpu`` (the calibrated model by default).

    Per micro-batch and rank: matmul FLOPs (6 x matmul parameters per token, 4 x with a frozen
    base, plus recomputed forwards; split by tp) at ``efficiency.matmul`` x peak (Float8 linears
    at the fp8 peak), attention FLOPs at ``efficiency.attention`` x that rate, elementwise and loss
    traffic at 80% of HBM bandwidth (:func:`elementwise_bytes`, 3x for forward and backward), and
    ``overhead_s`` per block. Communication per micro-batch (FSDP/ZeRO-3: all-gathers in forward
    and backward and a reduce-scatter; ZeRO-2: the reduce-scatter) overlaps compute: it costs the
    HBM traffic NCCL moves (2.5 passes per byte) plus whatever of its transfer time exceeds the
    compute time. Tensor-parallel collectives (two all-gathers and two reduce-scatters of the
    activations per block, forward and backward) sit on the critical path. Per step: DDP's
    all-reduce (overlapped with the last micro-batch), DeepSpeed's all-gather of updated weights,
    and AdamW over the local shard (28 bytes read and written per parameter, + 4 for clipping).
    """
    from orchestra.train.flops import attention_flops_per_token, model_flops_per_token

    eff = efficiency or efficiency_of(gpu)
    tau = calibration().overhead_s if overhead_s is None else overhead_s
    m, lay = w.model, w.layout
    tp, cp, pp = lay.tp, lay.cp, lay.pp
    dtype = "bf16" if w.precision.startswith(("bf16", "16")) else "fp32"
    if w.precision.startswith("16"):
        dtype = "fp16"
    peak = gpu.peak_flops(dtype)
    peak_linear = gpu.peak_flops("fp8") if w.fp8 else peak
    hbm = (w.hbm or gpu.hbm) * ELEMENTWISE_BANDWIDTH

    total = model_flops_per_token(m, w.vocab, w.seq, weight_grads=w.weight_grads, lm_head=w.lm_head)
    no_head = model_flops_per_token(m, w.vocab, w.seq, weight_grads=w.weight_grads, lm_head=False)
    attn = attention_flops_per_token(m, w.seq)
    blocks_mm = no_head - attn
    head_mm = total - no_head
    fwd_share = 1.0 / (3.0 if w.weight_grads else 2.0)
    if w.recompute == Recompute.full:
        rec_mm, rec_attn, rec_ew = blocks_mm * fwd_share, attn / 3.0, 1.0 / 3.0
    elif w.recompute == Recompute.selective:
        rec_mm, rec_attn, rec_ew = blocks_mm * fwd_share / 2.0, 0.0, 1.0 / 3.0
    else:
        rec_mm = rec_attn = rec_ew = 0.0
    share = (
        w.recomputed_blocks
        if w.recompute == Recompute.full
        else (1.0 if w.recompute != Recompute.none else 0.0)
    )
    rec_mm, rec_attn, rec_ew = rec_mm * share, rec_attn * share, rec_ew * share
    ref_fwd = (blocks_mm + head_mm) / (3.0 if w.weight_grads else 2.0) if w.reference_forward else 0.0
    rate = peak * eff.matmul
    per_token_s = (blocks_mm + rec_mm + ref_fwd) / (peak_linear * eff.matmul) + head_mm / rate
    per_token_s += (attn + rec_attn) / (rate * eff.attention)
    traffic = elementwise_bytes(m, w.fused, tp) * 3.0 * (1.0 + rec_ew) * m.n_layers
    if w.fp8:
        h, q, kv, f = m.dim, m.n_heads * m.head_size, m.n_kv_heads * m.head_size, m.ffn_dim
        traffic += (
            FP8_CAST_BYTES * ((5 * h + q + f) + (q + 2 * kv + 2 * h + 2 * f)) * m.n_layers * (1 + rec_ew) / tp
        )
    if w.lm_head:
        traffic += LOSS_BYTES_PER_LOGIT[w.fused_loss and tp == 1] * w.vocab / tp
    per_token_s = per_token_s / tp + traffic / hbm
    tokens_micro = w.micro_batch * w.seq / cp
    compute_micro = per_token_s * tokens_micro / pp

    counts = param_counts(m, w.vocab)
    p_rank = counts.per_rank(tp, pp)
    st, n = lay.strategy, lay.shard
    inter_node = lay.nodes > 1
    dp_bw = gpu.network if inter_node else gpu.intra_node
    shard_bw = gpu.intra_node if (st == StrategyName.fsdp and lay.hybrid_shard) else dp_bw
    overlapped = 0.0  # bytes per micro-batch that overlap compute
    overlapped_s = 0.0
    step_bytes_s = 0.0  # per-step collectives on the critical path
    gather_bytes = 1.0 if w.fp8 else 2.0
    if st == StrategyName.fsdp or st.zero_stage == 3:
        gathers = 2 if (lay.reshard_after_forward or st != StrategyName.fsdp) else 1
        reduce = w.reduce_bytes if st == StrategyName.fsdp else 2
        moved = (n - 1) / n * p_rank * (gathers * gather_bytes + (reduce if w.weight_grads else 0))
        overlapped, overlapped_s = moved, moved / shard_bw
        if st == StrategyName.fsdp and lay.hybrid_shard and inter_node:
            replicas = lay.world // max(1, n * tp)
            ar = 2 * (replicas - 1) / replicas * p_rank / n * w.reduce_bytes
            overlapped += ar
            overlapped_s += ar / gpu.network
    elif st.zero_stage == 2:
        moved = (n - 1) / n * p_rank * 2
        overlapped, overlapped_s = moved, moved / dp_bw
    comm_total = overlapped_s * w.accumulation
    exposed_micro = HBM_PASSES_PER_COMM_BYTE * overlapped / (w.hbm or gpu.hbm) + max(
        0.0, overlapped_s - compute_micro
    )
    exposed = exposed_micro * w.accumulation
    if tp > 1:  # sequence-parallel activations: 2 all-gathers + 2 reduce-scatters per block, x2 for backward
        tp_bytes = 8 * (tp - 1) / tp * tokens_micro * m.dim * 2 * m.n_layers / pp
        tp_s = tp_bytes / gpu.intra_node * w.accumulation
        comm_total += tp_s
        exposed += tp_s
    if cp > 1:  # context parallelism: keys and values gathered per block, reduce-scattered in backward
        kv_width = 2 * m.n_kv_heads * m.head_size / tp
        cp_bytes = 2 * (cp - 1) / cp * w.micro_batch * w.seq * kv_width * 2 * m.n_layers / pp
        cp_bw = gpu.intra_node if lay.devices >= tp * cp else gpu.network
        cp_s = cp_bytes / cp_bw * w.accumulation * (1.0 + rec_ew)
        comm_total += cp_s
        exposed += cp_s
    if st == StrategyName.ddp and lay.world > 1:
        ar = 2 * (lay.world - 1) / lay.world * p_rank * 4
        ar_s = ar / dp_bw
        comm_total += ar_s
        exposed += HBM_PASSES_PER_COMM_BYTE * ar / (w.hbm or gpu.hbm) + max(0.0, ar_s - compute_micro * 2 / 3)
    if st.zero_stage in (1, 2):
        ag = (n - 1) / n * p_rank * 2
        rs = (n - 1) / n * p_rank * 2 if st.zero_stage == 1 else 0.0
        step_bytes_s = (ag + rs) / dp_bw
        comm_total += step_bytes_s
        exposed += step_bytes_s
    compute = compute_micro * w.accumulation
    overhead = tau * (m.n_layers / pp) * w.accumulation
    local = p_rank / (n if st not in (StrategyName.single, StrategyName.ddp) else 1)
    optimizer = local * 32.0 / hbm if w.weight_grads else 0.0
    if (st == StrategyName.fsdp and lay.cpu_offload) or st == StrategyName.deepspeed_zero3_offload:
        # Weights to the GPU twice per micro-batch and gradients back over PCIe; the CPU's AdamW
        # at about 1e9 parameters per second and rank.
        pcie = local * (2 * 2 + 4) / gpu.pcie * w.accumulation
        exposed += pcie
        comm_total += pcie
        optimizer = local / 1e9
    step = compute + exposed + overhead + optimizer
    tokens_step = w.micro_batch * w.seq * w.accumulation * lay.dp
    return StepTime(
        compute, comm_total, exposed, overhead, optimizer, step, tokens_step, total, peak, lay.world
    )


# --------------------------------------------------------------------------------------------
# Anchors: published throughputs the time model is calibrated on and checked against


def _mpt(size: str, dim: int, layers: int, heads: int) -> ModelConfig:
    """An MPT model (llm-foundry scripts/train/yamls/pretrain/mpt-<size>.yaml) in this model's terms.

    MPT's 4d GELU MLP has the matmul parameters of a SwiGLU MLP of width 8d/3; its embedding is
    tied and its vocabulary 50368. Its parameter counts in the benchmark table check the shapes.
    """
    return ModelConfig(
        name=f"mpt-{size}",
        dim=dim,
        n_layers=layers,
        n_heads=heads,
        n_kv_heads=heads,
        ffn_dim=round(8 * dim / 3),
        vocab_size=50368,
        tie_embeddings=True,
        max_seq_len=65536,
    )


LLAMA_31_8B = ModelConfig(
    name="llama-3.1-8b", dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
    vocab_size=128256, max_seq_len=8192,
)  # fmt: skip
LLM_FOUNDRY = (
    "llm-foundry scripts/train/benchmarking/README.md: MPT, FSDP FULL_SHARD, amp_bf16, torch cross-entropy"
)
TORCHTITAN = (
    "torchtitan docs/performance.md Tables 1 and 3: Llama 3.1 8B, FSDP2, local batch 2, "
    "seq 8192, selective activation checkpointing, H100 SXM with 96 GB HBM2e (2.4 TB/s) at 500 W"
)
H100_TORCHTITAN = replace(
    GPUS["h100-80gb"], key="h100-96gb-hbm2e", memory_mib=97871, hbm=2400 * GB,
    source="torchtitan docs/performance.md (Grand Teton: HBM2e, 500 W power limit)",
)  # fmt: skip


@dataclass(frozen=True)
class Anchor:
    """One published training throughput."""

    name: str
    source: str
    gpu: GPU
    model: ModelConfig
    seq: int
    gpus: int
    micro_batch: int
    accumulation: int
    published: float
    """Tokens per second per GPU, as published."""
    role: str
    """calibrate: fixes the constants; validate: held out, predicted within 15%."""
    recompute: Recompute = Recompute.none
    fused: bool = True
    fp8: bool = False
    published_mfu: float | None = None

    def workload(self) -> Workload:
        devices = min(8, self.gpus)
        layout = Layout(StrategyName.fsdp, devices, self.gpus // devices)
        return Workload(
            model=self.model,
            vocab=self.model.vocab_size or 0,
            seq=self.seq,
            micro_batch=self.micro_batch,
            accumulation=self.accumulation,
            layout=layout,
            fused=self.fused,
            fused_loss=False,
            recompute=self.recompute,
            recomputed_blocks=1.0 if self.recompute == Recompute.full else 0.0,
            fp8=self.fp8,
            hbm=self.gpu.hbm if self.gpu is H100_TORCHTITAN else None,
        )


_H100, _A100 = GPUS["h100-80gb"], GPUS["a100-80gb"]
_FULL = Recompute.full
ANCHORS: tuple[Anchor, ...] = (
    # Calibration: the two rows the constants are solved from on Hopper, one on Ampere.
    Anchor("MPT-1B, 8xH100, seq 2048", LLM_FOUNDRY, _H100, _mpt("1b", 2048, 24, 16), 2048, 8, 14, 1, 45455, "calibrate", published_mfu=0.4182),
    Anchor("MPT-7B, 8xH100, seq 2048", LLM_FOUNDRY, _H100, _mpt("7b", 4096, 32, 32), 2048, 8, 6, 1, 10643, "calibrate", published_mfu=0.4644),
    Anchor("MPT-7B, 8xA100-80GB, seq 2048", LLM_FOUNDRY, _A100, _mpt("7b", 4096, 32, 32), 2048, 8, 6, 2, 4641, "calibrate", published_mfu=0.6423),
    # Validation: the other 8-GPU seq-2048 rows of both tables, the H100 rows at other lengths
    # and GPU counts, and torchtitan's runs (another framework, with compile and Float8).
    Anchor("MPT-760M, 8xH100, seq 2048", LLM_FOUNDRY, _H100, _mpt("760m", 1536, 24, 12), 2048, 8, 24, 2, 63147, "validate", published_mfu=0.3490),
    Anchor("MPT-13B, 8xH100, seq 2048", LLM_FOUNDRY, _H100, _mpt("13b", 5120, 40, 40), 2048, 8, 2, 1, 4792, "validate", published_mfu=0.3979),
    Anchor("MPT-30B, 8xH100, seq 2048, full AC", LLM_FOUNDRY, _H100, _mpt("30b", 7168, 48, 56), 2048, 8, 3, 21, 2002, "validate", _FULL, published_mfu=0.3811),
    Anchor("MPT-760M, 16xH100, seq 2048", LLM_FOUNDRY, _H100, _mpt("760m", 1536, 24, 12), 2048, 16, 24, 1, 68551, "validate", published_mfu=0.3789),
    Anchor("MPT-1B, 16xH100, seq 2048", LLM_FOUNDRY, _H100, _mpt("1b", 2048, 24, 16), 2048, 16, 20, 1, 46037, "validate", published_mfu=0.4236),
    Anchor("MPT-3B, 16xH100, seq 2048", LLM_FOUNDRY, _H100, _mpt("3b", 2560, 32, 20), 2048, 16, 10, 3, 24142, "validate", published_mfu=0.4373),
    Anchor("MPT-1B, 8xH100, seq 8192", LLM_FOUNDRY, _H100, _mpt("1b", 2048, 24, 16), 8192, 8, 3, 4, 29157, "validate", published_mfu=0.3773),
    Anchor("MPT-3B, 8xH100, seq 4096", LLM_FOUNDRY, _H100, _mpt("3b", 2560, 32, 20), 4096, 8, 5, 6, 20964, "validate", published_mfu=0.4231),
    Anchor("MPT-7B, 8xH100, seq 4096, full AC", LLM_FOUNDRY, _H100, _mpt("7b", 4096, 32, 32), 4096, 8, 16, 2, 8611, "validate", _FULL, published_mfu=0.4042),
    Anchor("MPT-7B, 8xH100, seq 8192, full AC", LLM_FOUNDRY, _H100, _mpt("7b", 4096, 32, 32), 8192, 8, 8, 2, 6935, "validate", _FULL, published_mfu=0.3714),
    Anchor("MPT-13B, 8xH100, seq 4096, full AC", LLM_FOUNDRY, _H100, _mpt("13b", 5120, 40, 40), 4096, 8, 10, 3, 4717, "validate", _FULL, published_mfu=0.4160),
    Anchor("MPT-70B, 64xH100, seq 2048, full AC", LLM_FOUNDRY, _H100, _mpt("70b", 8192, 80, 64), 2048, 64, 8, 4, 1039, "validate", _FULL, published_mfu=0.4257),
    Anchor("Llama-3.1-8B, 8xH100, FSDP", TORCHTITAN, H100_TORCHTITAN, LLAMA_31_8B, 8192, 8, 2, 1, 5762, "validate", Recompute.selective, fused=False),
    Anchor("Llama-3.1-8B, 8xH100, FSDP + compile", TORCHTITAN, H100_TORCHTITAN, LLAMA_31_8B, 8192, 8, 2, 1, 6667, "validate", Recompute.selective),
    Anchor("Llama-3.1-8B, 8xH100, FSDP + compile + Float8", TORCHTITAN, H100_TORCHTITAN, LLAMA_31_8B, 8192, 8, 2, 1, 8532, "validate", Recompute.selective, fp8=True),
    Anchor("Llama-3.1-8B, 128xH100, FSDP", TORCHTITAN, H100_TORCHTITAN, LLAMA_31_8B, 8192, 128, 2, 1, 5605, "validate", Recompute.selective, fused=False),
    Anchor("Llama-3.1-8B, 128xH100, FSDP + compile + Float8", TORCHTITAN, H100_TORCHTITAN, LLAMA_31_8B, 8192, 128, 2, 1, 8380, "validate", Recompute.selective, fp8=True),
    Anchor("MPT-125M, 8xA100-80GB, seq 2048", LLM_FOUNDRY, _A100, _mpt("125m", 768, 12, 12), 2048, 8, 40, 2, 142830, "validate", published_mfu=0.4479),
    Anchor("MPT-350M, 8xA100-80GB, seq 2048", LLM_FOUNDRY, _A100, _mpt("350m", 1024, 24, 16), 2048, 8, 32, 2, 58782, "validate", published_mfu=0.5162),
    Anchor("MPT-760M, 8xA100-80GB, seq 2048", LLM_FOUNDRY, _A100, _mpt("760m", 1536, 24, 12), 2048, 8, 24, 2, 32434, "validate", published_mfu=0.5685),
    Anchor("MPT-1B, 8xA100-80GB, seq 2048", LLM_FOUNDRY, _A100, _mpt("1b", 2048, 24, 16), 2048, 8, 14, 4, 20513, "validate", published_mfu=0.5986),
    Anchor("MPT-3B, 8xA100-80GB, seq 2048", LLM_FOUNDRY, _A100, _mpt("3b", 2560, 32, 20), 2048, 8, 10, 2, 10811, "validate", published_mfu=0.6211),
    Anchor("MPT-13B, 8xA100-80GB, seq 2048", LLM_FOUNDRY, _A100, _mpt("13b", 5120, 40, 40), 2048, 8, 2, 3, 2262, "validate", published_mfu=0.5957),
    Anchor("MPT-30B, 8xA100-80GB, seq 2048, full AC", LLM_FOUNDRY, _A100, _mpt("30b", 7168, 48, 56), 2048, 8, 3, 21, 916, "validate", _FULL, published_mfu=0.5530),
    Anchor("MPT-7B, 8xA100-80GB, seq 8192, full AC", LLM_FOUNDRY, _A100, _mpt("7b", 4096, 32, 32), 8192, 8, 8, 2, 3206, "validate", _FULL, published_mfu=0.5447),
)  # fmt: skip
VALIDATION_TOLERANCE = 0.15


@dataclass(frozen=True)
class Calibration:
    """The constants the calibration anchors fix: a matmul efficiency per architecture and one
    framework overhead per block and micro-batch (launches, hooks, allocator), shared by all."""

    overhead_s: float
    matmul: dict[str, float]
    source: dict[str, str]


def _solve_matmul(anchor: Anchor, overhead_s: float, family: str) -> float:
    """The matmul efficiency at which ``anchor``'s predicted throughput is its published one."""
    lo, hi = 0.05, 1.5
    for _ in range(60):
        mid = (lo + hi) / 2
        eff = Efficiency(family, mid, ATTENTION_RATIO[family], "")
        if step_time(anchor.workload(), anchor.gpu, eff, overhead_s).tokens_per_s_per_gpu < anchor.published:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


@cache
def calibration() -> Calibration:
    """Solve the constants from the ``calibrate`` anchors (a few milliseconds; cached).

    Hopper has two anchors and two unknowns: the overhead is the one at which both need the same
    matmul efficiency (the 7B's many small micro-batches weigh the overhead, the 1B's large ones
    the efficiency). Ampere's one anchor then fixes its efficiency at that overhead.
    """
    calib = [a for a in ANCHORS if a.role == "calibrate"]
    hopper = [a for a in calib if a.gpu.family == "hopper"]
    ampere = [a for a in calib if a.gpu.family == "ampere"]

    def gap(tau: float) -> float:
        return _solve_matmul(hopper[0], tau, "hopper") - _solve_matmul(hopper[1], tau, "hopper")

    lo, hi = 0.0, 0.02
    if gap(lo) * gap(hi) > 0:
        raise RuntimeError("the Hopper calibration anchors admit no common overhead")
    for _ in range(40):
        mid = (lo + hi) / 2
        if gap(lo) * gap(mid) <= 0:
            hi = mid
        else:
            lo = mid
    tau = (lo + hi) / 2
    matmul = {
        "hopper": sum(_solve_matmul(a, tau, "hopper") for a in hopper) / len(hopper),
        "ampere": sum(_solve_matmul(a, tau, "ampere") for a in ampere) / len(ampere),
    }
    source = {
        "hopper": "; ".join(a.name for a in hopper),
        "ampere": "; ".join(a.name for a in ampere),
    }
    return Calibration(tau, matmul, source)


def efficiency_of(gpu: GPU) -> Efficiency:
    family = FAMILY_BORROWS.get(gpu.family, "hopper")
    cal = calibration()
    return Efficiency(family, cal.matmul[family], ATTENTION_RATIO[family], cal.source[family])


@dataclass(frozen=True)
class AnchorResult:
    anchor: Anchor
    predicted: float
    predicted_mfu: float

    @property
    def error(self) -> float:
        return self.predicted / self.anchor.published - 1.0


def anchor_results() -> list[AnchorResult]:
    """Every anchor's predicted tokens/s per GPU next to the published one."""
    out = []
    for a in ANCHORS:
        t = step_time(a.workload(), a.gpu)
        out.append(AnchorResult(a, t.tokens_per_s_per_gpu, t.mfu))
    return out


# --------------------------------------------------------------------------------------------
# Budget


@dataclass(frozen=True)
class Budget:
    """What a token budget costs at the planned throughput."""

    tokens: float
    wall_s: float
    gpu_hours: float
    power_w: float
    energy_kwh: float
    co2_kg: float


def budget(
    tokens: float,
    time: StepTime,
    gpu: GPU,
    layout: Layout,
    *,
    power_fraction: float,
    node_overhead_w: float,
    grid_g_per_kwh: float,
    pue: float = 1.0,
) -> Budget:
    """Wall time, GPU-hours, kWh and kg CO2 of ``tokens`` training tokens.

    Power is each GPU's TDP x ``power_fraction`` (training draws most, not all, of it) plus
    ``node_overhead_w`` per node (CPUs, memory, NICs, fans), times the data centre's PUE
    (energy.pue); CO2 is that energy at the grid's intensity.
    """
    wall = tokens / time.tokens_per_s
    power = layout.world * gpu.tdp_w * power_fraction + layout.nodes * node_overhead_w
    kwh = power * wall / 3600.0 / 1000.0 * pue
    return Budget(tokens, wall, wall * layout.world / 3600.0, power, kwh, kwh * grid_g_per_kwh / 1000.0)


# --------------------------------------------------------------------------------------------
# The plan of one job


@dataclass(frozen=True)
class Shape:
    """The model a job trains and the rows it feeds it."""

    model: ModelConfig
    vocab: int
    seq: int
    rows_per_sample: int = 1
    """DPO: a chosen and a rejected row per sample."""


def _base_shape(path: str) -> tuple[ModelConfig, int]:
    """A base model's shape: a Hugging Face folder's config.json (or the Hub cache's), or an Orchestra checkpoint's metadata."""
    from orchestra.model.hf import HFImportError, model_config_from_hf

    folder = Path(path)
    config_file = folder / "config.json"
    if not folder.exists():
        from orchestra.model.hub import is_hub_id

        if not is_hub_id(path):
            raise ConfigError(f"finetune.init_from: {path!r} does not exist")
        from huggingface_hub import try_to_load_from_cache

        repo, _, revision = path.partition("@")
        cached = try_to_load_from_cache(repo, "config.json", revision=revision or None)
        if not isinstance(cached, str):
            raise ConfigError(
                f"finetune.init_from: {path!r} is not in the Hugging Face cache; the plan reads only "
                "local files (download it first, or give its folder)"
            )
        config_file = Path(cached)
    if config_file.is_file():
        try:
            return model_config_from_hf(json.loads(config_file.read_text()))
        except (HFImportError, json.JSONDecodeError) as err:
            raise ConfigError(f"finetune.init_from: {config_file}: {err}") from None
    from orchestra.train.checkpoint import CheckpointError
    from orchestra.train.checkpoint.io import read_meta

    try:
        meta = read_meta(folder)
    except CheckpointError as err:
        raise ConfigError(f"finetune.init_from: {err}") from None
    return meta.model_config, meta.vocab_size


def job_shape(cfg: TrainConfig) -> Shape:
    """Model, vocabulary and row length as orchestra.train.run.plan_run decides them, without the data.

    A base (finetune.init_from / model.path) gives its shape and vocabulary; otherwise the
    vocabulary is model.vocab_size, or the tokenizer's (data.tokenizer_path, else data.vocab_size
    for the one trained on the corpus) rounded up to model.pad_vocab_to.
    """
    m = cfg.model
    needs_base = cfg.finetune.method != FinetuneMethod.none or cfg.task.name != TaskName.pretrain
    init_from = base_path(cfg)
    seq = m.max_seq_len
    if init_from and needs_base:
        base, vocab = _base_shape(init_from)
        m = replace(base, vocab_size=vocab, kernels=cfg.model.kernels, path=None)
        seq = min(m.max_seq_len, cfg.finetune.seq_len) if cfg.finetune.seq_len else m.max_seq_len
    elif m.vocab_size is not None:
        vocab = m.vocab_size
    else:
        tokenizer_vocab = cfg.data.vocab_size
        if cfg.data.tokenizer_path:
            from tokenizers import Tokenizer

            try:
                tokenizer_vocab = Tokenizer.from_file(cfg.data.tokenizer_path).get_vocab_size()
            except Exception as err:  # tokenizers raises its own Exception subclass
                raise ConfigError(f"data.tokenizer_path: {cfg.data.tokenizer_path}: {err}") from None
        vocab = padded_vocab_size(m, tokenizer_vocab)
    return Shape(m, vocab, seq, task_spec(cfg.task.name).rows_per_example)


@dataclass(frozen=True)
class MemoryRow:
    key: str
    label: str
    bytes: float
    note: str = ""


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes one rank needs at its peak, term by term, against the GPU's memory."""

    rows: tuple[MemoryRow, ...]
    capacity: float
    host_per_node: float = 0.0

    @property
    def total(self) -> float:
        return sum(r.bytes for r in self.rows)

    @property
    def ratio(self) -> float:
        return self.total / self.capacity

    @property
    def fits(self) -> bool:
        return self.total <= self.capacity

    @property
    def largest(self) -> MemoryRow:
        return max(self.rows, key=lambda r: r.bytes)


@dataclass(frozen=True)
class Assessment:
    """Memory and time of one configuration."""

    config: TrainConfig
    shape: Shape
    layout: Layout
    precision: str
    accumulation: int
    memory: MemoryPlan
    time: StepTime
    kernels: Kernels


def _frozen_base(cfg: TrainConfig) -> bool:
    return method_spec(cfg.finetune.method).frozen_base


def nf4_parameters(cfg: TrainConfig, counts: ParamCounts) -> float:
    """Weights finetune=qlora keeps in NF4: the blocks' projections (their biases too, a rounding)."""
    return float(counts.n_layers * counts.block_split) if cfg.finetune.method == FinetuneMethod.qlora else 0.0


def assess(cfg: TrainConfig, shape: Shape, gpu: GPU, pc: PlanConfig) -> Assessment:
    """Memory per rank and step time of ``cfg`` (validated first; ConfigError naming the key)."""
    validate(cfg)
    layout = layout_of(cfg)
    layout.check()
    t, st, m = cfg.trainer, cfg.strategy, shape.model
    precision = resolve_precision(t.precision, t.accelerator)
    num = numerics(st.name, precision)
    kernels = kernels_of(cfg, layout.tp)
    if layout.pp > 1:  # the schedule takes the loss outside the last stage: whole logits, unfused
        kernels = replace(kernels, loss=False)
    dp = data_parallel_size(cfg)
    accumulation = accumulation_steps(t, dp)
    counts = param_counts(m, shape.vocab)
    frozen = _frozen_base(cfg)
    trainable = trainable_parameters(cfg, counts) if frozen else None
    task = task_spec(cfg.task.name)
    states = state_memory(
        counts,
        layout,
        num,
        trainable,
        reference=task.reference and not frozen,
        nf4=nf4_parameters(cfg, counts),
    )
    rows = t.micro_batch_size * shape.rows_per_sample
    acts = activation_memory(
        m, shape.vocab, shape.seq, rows, num, kernels, st.activation_checkpointing, st.ac_every_k,
        tp=layout.tp, pp=layout.pp, cp=layout.cp,
        packed=cfg.task.name == TaskName.sft and cfg.task.pack,
        lm_head=task.lm_head,
    )  # fmt: skip
    memory_rows = (
        MemoryRow("parameters", "parameters", states.parameters),
        MemoryRow("gradients", "gradients", states.gradients),
        MemoryRow("optimizer", "optimizer states", states.optimizer),
        MemoryRow("working", "gathered parameters, buckets", states.working, states.working_note),
        MemoryRow("activations", "activations", acts.layers),
        MemoryRow("recompute", "recomputed block", acts.recompute),
        MemoryRow("logits", "logits and loss", acts.logits, "fused kernel" if kernels.loss and layout.tp == 1 else "torch"),
        MemoryRow("autocast", "autocast weight copies", acts.autocast),
        MemoryRow("overhead", "CUDA, NCCL, allocator", pc.overhead_gib * GIB),
    )  # fmt: skip
    memory = MemoryPlan(memory_rows, gpu.memory_bytes, states.host_per_node)
    mode = st.activation_checkpointing
    wrapped = sum(checkpointed_layers(mode, st.ac_every_k, m.n_layers))
    work = Workload(
        model=m,
        vocab=shape.vocab,
        seq=shape.seq,
        micro_batch=rows,
        accumulation=accumulation,
        layout=layout,
        precision=precision,
        fused=kernels.elementwise,
        fused_loss=kernels.loss,
        recompute=Recompute.full if wrapped else Recompute.none,
        recomputed_blocks=wrapped / m.n_layers,
        fp8=cfg.strategy.fp8 != "off",
        weight_grads=not frozen,
        lm_head=task.lm_head,
        reference_forward=task.reference,
    )
    return Assessment(cfg, shape, layout, precision, accumulation, memory, step_time(work, gpu), kernels)


@dataclass(frozen=True)
class Fix:
    """One change to try, planned again with it applied."""

    overrides: tuple[str, ...]
    why: str
    total: float | None
    """Bytes per rank with the change; None when the change is not possible here."""
    fits: bool
    tokens_per_s_per_gpu: float | None = None


@dataclass(frozen=True)
class Plan:
    """Everything `orchestra-plan` reports for one job."""

    gpu: GPU
    assessment: Assessment
    budget: Budget
    fixes: tuple[Fix, ...]
    notes: tuple[str, ...]

    @property
    def memory(self) -> MemoryPlan:
        return self.assessment.memory

    @property
    def time(self) -> StepTime:
        return self.assessment.time

    @property
    def verdict(self) -> str:
        return "fits" if self.memory.fits else "does not fit"


def _with(cfg: TrainConfig, **sections: dict[str, Any]) -> TrainConfig:
    """``cfg`` with some fields of some sections replaced (the config itself is not changed)."""
    return replace(cfg, **{name: replace(getattr(cfg, name), **values) for name, values in sections.items()})


def _try(cfg: TrainConfig, shape: Shape, gpu: GPU, pc: PlanConfig) -> Assessment | None:
    try:
        return assess(cfg, shape, gpu, pc)
    except ConfigError:
        return None


Candidate = tuple[tuple[str, ...], dict[str, dict[str, Any]]]
"""One change to try: its command-line overrides and the config sections they replace."""


def fixes(base: Assessment, gpu: GPU, pc: PlanConfig) -> list[Fix]:
    """The changes to try for a layout that does not fit, in order, each planned again.

    More nodes (states shard over more ranks), ZeRO-3 / FSDP (shard the states at all),
    activation recomputation, tensor parallelism (strategy.tp), a smaller micro batch (the global
    batch stays: accumulation grows); then all of those that help, together. Each step tries the
    smallest change that fits, else the largest one possible.
    """
    cfg, shape = base.config, base.shape
    st, t = cfg.strategy, cfg.trainer
    out: list[Fix] = []
    combined: dict[str, dict[str, Any]] = {}
    combined_overrides: list[str] = []

    def best(
        candidates: list[Candidate],
    ) -> tuple[Fix, dict[str, dict[str, Any]]] | None:
        last: tuple[Fix, dict[str, dict[str, Any]]] | None = None
        for overrides, sections in candidates:
            a = _try(_with(cfg, **sections), shape, gpu, pc)
            if a is None:
                continue
            last = (Fix(overrides, "", a.memory.total, a.memory.fits, a.time.tokens_per_s_per_gpu), sections)
            if a.memory.fits:
                break
        return last

    def add(why: str, candidates: list[Candidate], impossible: str) -> None:
        found = best(candidates) if candidates else None
        if found is None:
            out.append(Fix((), f"{why}: {impossible}", None, False))
            return
        fix, sections = found
        out.append(replace(fix, why=why))
        if fix.total is not None and fix.total < base.memory.total:
            for name, values in sections.items():
                combined.setdefault(name, {}).update(values)
            combined_overrides.extend(fix.overrides)

    sharded = st.name not in (StrategyName.single, StrategyName.ddp)
    nodes: list[Candidate] = [
        ((f"trainer.num_nodes={t.num_nodes * k}",), {"trainer": {"num_nodes": t.num_nodes * k}})
        for k in (2, 4, 8)
    ]
    add("more nodes", nodes if sharded else [], f"strategy={st.name.value} keeps whole states on every rank")
    shard: list[Candidate]
    if st.name in (StrategyName.deepspeed_zero1, StrategyName.deepspeed_zero2):
        shard = [(("strategy=deepspeed_zero3",), {"strategy": {"name": StrategyName.deepspeed_zero3}})]
    elif not sharded and t.world_size > 1:
        shard = [(("strategy=fsdp",), {"strategy": {"name": StrategyName.fsdp}})]
    else:
        shard = []
    add("ZeRO-3 / FSDP", shard, "already sharded" if sharded else "one device: nothing to shard over")
    recompute: list[Candidate] = (
        [
            (
                ("strategy.activation_checkpointing=full",),
                {"strategy": {"activation_checkpointing": ActivationCheckpointing.full}},
            )
        ]
        if st.activation_checkpointing != ActivationCheckpointing.full
        else []
    )
    add("activation recomputation", recompute, "already recomputing every block")
    tps = [k for k in (2, 4, 8) if k > st.tp and k <= t.devices]
    strategy_part: dict[str, Any] = {} if st.name == StrategyName.fsdp else {"name": StrategyName.fsdp}
    tp: list[Candidate] = [
        (
            (*(() if not strategy_part else ("strategy=fsdp",)), f"strategy.tp={k}"),
            {"strategy": {**strategy_part, "tp": k}},
        )
        for k in tps
    ]
    add("tensor parallelism", tp, "no larger tensor-parallel degree divides the devices, heads and rows")
    micro: list[Candidate] = []
    m = t.micro_batch_size // 2
    while m >= 1:
        micro.append(((f"trainer.micro_batch_size={m}",), {"trainer": {"micro_batch_size": m}}))
        m //= 2
    add("smaller micro batch", micro, "already 1")
    if combined and len(combined_overrides) > 1:
        a = _try(_with(cfg, **combined), shape, gpu, pc)
        if a is not None:
            out.append(
                Fix(
                    tuple(dict.fromkeys(combined_overrides)),
                    "all of the above",
                    a.memory.total,
                    a.memory.fits,
                    a.time.tokens_per_s_per_gpu,
                )
            )
    return out


def plan_job(cfg: TrainConfig, pc: PlanConfig, gpu: GPU | None = None) -> Plan:
    """The plan of ``cfg`` on ``pc.gpu`` (or ``gpu``): memory per rank, time, budget, verdict and fixes.

    Raises :class:`ConfigError` naming the key for a config that cannot run or a layout that does
    not divide (the same rules as orchestra-train, :func:`orchestra.config.validate`).
    """
    pc.validate()
    gpu = gpu or (detect_gpu() if pc.gpu == "auto" else gpu_by_name(pc.gpu))
    validate(cfg)
    shape = job_shape(cfg)
    effective = replace(cfg, model=shape.model)
    a = assess(effective, shape, gpu, pc)
    tokens = pc.tokens or float(
        cfg.trainer.max_steps * cfg.trainer.global_batch_size * shape.seq * shape.rows_per_sample
    )
    cost = budget(
        tokens, a.time, gpu, a.layout, power_fraction=pc.power_fraction,
        node_overhead_w=pc.node_overhead_w, grid_g_per_kwh=pc.grid_g_per_kwh, pue=cfg.energy.pue,
    )  # fmt: skip
    notes = []
    eff = efficiency_of(gpu)
    if gpu.family != eff.family:
        notes.append(
            f"{gpu.key}: no published {gpu.family} anchors; its efficiency is the {eff.family} calibration's"
        )
    if not a.precision.startswith(("bf16", "16")):
        notes.append(f"trainer.precision={a.precision}: the efficiency is calibrated on bf16 runs")
    if a.layout.cpu_offload or a.layout.strategy == StrategyName.deepspeed_zero3_offload:
        notes.append("CPU offload: PCIe traffic and the CPU optimizer step are estimated, not calibrated")
    if cfg.strategy.fp8 != "off":
        notes.append(
            f"strategy.fp8={cfg.strategy.fp8}: timed at the FP8 peak for the blocks' linears; "
            "the calibration's Float8 anchors are torchtitan's tensorwise runs"
        )
    found = tuple(fixes(a, gpu, pc)) if not a.memory.fits else ()
    return Plan(gpu, a, cost, found, tuple(notes))


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    """The plan as plain JSON-able values (bytes as GiB, times in seconds)."""
    a, mem, time, b = plan.assessment, plan.memory, plan.time, plan.budget
    lay, m = a.layout, a.shape.model
    counts = param_counts(m, a.shape.vocab)
    return {
        "verdict": plan.verdict,
        "fits": mem.fits,
        "gpu": {"key": plan.gpu.key, "memory_gib": plan.gpu.memory_bytes / GIB, "name": plan.gpu.device_name},
        "model": {
            "name": m.name,
            "parameters": counts.total,
            "vocab_size": a.shape.vocab,
            "seq_len": a.shape.seq,
        },
        "layout": {
            "strategy": lay.strategy.value,
            "devices": lay.devices,
            "nodes": lay.nodes,
            "world": lay.world,
            "tp": lay.tp,
            "pp": lay.pp,
            "cp": lay.cp,
            "data_parallel": lay.dp,
            "shard": lay.shard,
            "precision": a.precision,
            "micro_batch_size": a.config.trainer.micro_batch_size,
            "global_batch_size": a.config.trainer.global_batch_size,
            "accumulation": a.accumulation,
        },
        "memory_gib": {r.key: r.bytes / GIB for r in mem.rows},
        "memory_rows": [
            {"key": r.key, "label": r.label, "gib": r.bytes / GIB, "note": r.note} for r in mem.rows
        ],
        "memory_total_gib": mem.total / GIB,
        "memory_ratio": mem.ratio,
        "largest": mem.largest.key,
        "host_per_node_gib": mem.host_per_node / GIB,
        "time": {
            "step_s": time.step_s,
            "compute_s": time.compute_s,
            "communication_s": time.communication_s,
            "exposed_communication_s": time.exposed_s,
            "overhead_s": time.overhead_s,
            "optimizer_s": time.optimizer_s,
            "tokens_per_step": time.tokens_per_step,
            "tokens_per_s": time.tokens_per_s,
            "tokens_per_s_per_gpu": time.tokens_per_s_per_gpu,
            "mfu": time.mfu,
            "model_flops_per_token": time.model_flops_per_token,
        },
        "budget": {
            "tokens": b.tokens,
            "wall_hours": b.wall_s / 3600.0,
            "gpu_hours": b.gpu_hours,
            "power_kw": b.power_w / 1000.0,
            "energy_kwh": b.energy_kwh,
            "co2_kg": b.co2_kg,
        },
        "fixes": [
            {
                "why": f.why,
                "overrides": list(f.overrides),
                "memory_total_gib": None if f.total is None else f.total / GIB,
                "fits": f.fits,
                "tokens_per_s_per_gpu": f.tokens_per_s_per_gpu,
            }
            for f in plan.fixes
        ],
        "notes": list(plan.notes),
    }
