"""The model's configuration: shape and numerics of the decoder, and the rules they must obey.

It lives next to the model so that model/ depends on nothing above it; orchestra.config
re-exports these names for the Hydra schema. Standard library only (no torch, no Hydra), so
importing the configuration stays cheap.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any

IGNORE_INDEX = -100
"""Target value that takes no loss (PyTorch's cross-entropy default): prompts, padding, soft prompts.
Data (orchestra.data.tasks) writes it, the model's loss skips it; both read it from here."""


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key and what is accepted."""


class InitScheme(str, Enum):
    """Weight initialisation schemes; the formulas are in orchestra/model/init.py."""

    normal = "normal"
    xavier_uniform = "xavier_uniform"
    kaiming_normal = "kaiming_normal"
    small = "small"


class Activation(str, Enum):
    """The gate nonlinearity of the gated MLP: down(act(gate(x)) * up(x))."""

    silu = "silu"
    """SwiGLU (Llama, Mistral, Qwen, Phi-3)."""
    gelu_tanh = "gelu_tanh"
    """GeGLU with the tanh approximation of GELU (Gemma)."""


class RopeType(str, Enum):
    """How RoPE's frequencies are scaled for a context longer than the one pretrained on (rope.py)."""

    default = "default"
    linear = "linear"
    dynamic = "dynamic"
    llama3 = "llama3"
    yarn = "yarn"
    longrope = "longrope"


@dataclass
class RopeScaling:
    """RoPE frequency scaling, in Hugging Face's ``rope_parameters`` terms (formulas in rope.py).

    Which keys matter depends on ``type``: linear and dynamic use ``factor``; llama3 adds
    ``low_freq_factor``, ``high_freq_factor`` and ``original_max_seq_len``; yarn ``factor``,
    ``original_max_seq_len``, ``beta_fast``/``beta_slow``, ``mscale``/``mscale_all_dim``,
    ``attention_factor`` and ``truncate``; longrope (Phi-3's "su") ``short_factor``/``long_factor``
    (one per frequency), ``original_max_seq_len`` and ``attention_factor``.
    """

    type: RopeType = RopeType.default
    """Which scaling: default (none), linear, dynamic (NTK), llama3, yarn or longrope."""
    factor: float | None = None
    """Context extension factor; None for longrope means max_seq_len / original_max_seq_len."""
    original_max_seq_len: int | None = None
    """Context the base was pretrained with (dynamic: the length beyond which it starts scaling;
    None means model.max_seq_len)."""
    low_freq_factor: float = 1.0
    """llama3: wavelengths longer than original / low_freq_factor are divided by factor."""
    high_freq_factor: float = 4.0
    """llama3: wavelengths shorter than original / high_freq_factor are kept; a ramp in between."""
    beta_fast: float = 32.0
    """yarn: rotations below which dimensions are interpolated (the ramp's fast end)."""
    beta_slow: float = 1.0
    """yarn: rotations above which dimensions are extrapolated (the ramp's slow end)."""
    mscale: float | None = None
    """yarn: with mscale_all_dim, the numerator of the derived attention factor (DeepSeek style)."""
    mscale_all_dim: float | None = None
    """yarn: the denominator's mscale of the derived attention factor."""
    truncate: bool = True
    """yarn: round the ramp's bounds to whole dimensions, as transformers does by default."""
    attention_factor: float | None = None
    """Multiplier of cos/sin (yarn, longrope); None derives it from the factor as transformers does."""
    short_factor: list[float] | None = None
    """longrope: one divisor per frequency (head_dim / 2) within the original context."""
    long_factor: list[float] | None = None
    """longrope: the divisors once positions pass the original context."""


class KernelBackend(str, Enum):
    """Where the fusable ops run; the selection rules are in orchestra/model/ops.py."""

    auto = "auto"
    torch = "torch"
    triton = "triton"


class AttentionImpl(str, Enum):
    """How attention is computed; every choice gives the same outputs (orchestra/model/flex.py)."""

    auto = "auto"
    """SDPA reading grouped key/value heads in place for causal rows; on CUDA, FlexAttention
    block masks for packed rows, sliding windows and soft-capped scores (dense masks elsewhere)."""
    sdpa = "sdpa"
    """SDPA everywhere: grouped heads in place, dense masks for packed rows and windows."""
    flex = "flex"
    """FlexAttention for every forward without a KV cache (compiled on CUDA, its reference on CPU)."""
    repeat_kv = "repeat_kv"
    """Key/value heads copied to the query heads and dense masks, as transformers' eager code does."""


class SdpaBackend(str, Enum):
    """The SDPA kernel tried first on CUDA; the others stay as fallbacks, in torch's order."""

    auto = "auto"
    cudnn = "cudnn"
    flash = "flash"
    efficient = "efficient"
    math = "math"


def require(condition: bool, key: str, message: str) -> None:
    """Raise the one ConfigError naming ``key`` and what is accepted, unless ``condition`` holds."""
    if not condition:
        raise ConfigError(f"{key}: {message}")


@dataclass
class ModelConfig:
    """Shape and numerics of the Llama-style decoder."""

    name: str = "debug"
    """A label for logs and reports; it does not change the model."""
    dim: int = 256
    """Width of the residual stream."""
    n_layers: int = 4
    """Number of decoder blocks."""
    n_heads: int = 4
    """Query heads per attention layer; they split ``dim`` evenly."""
    n_kv_heads: int = 2
    """Key/value heads (grouped-query attention); ``n_heads`` must be a multiple of it."""
    ffn_dim: int = 704
    """Hidden width of the SwiGLU MLP."""
    vocab_size: int | None = None
    """Embedding rows. None: taken from the tokenizer, rounded up to a multiple of ``pad_vocab_to``."""
    pad_vocab_to: int = 64
    """Multiple the tokenizer's vocabulary is rounded up to when ``vocab_size`` is None."""
    max_seq_len: int = 256
    """Longest sequence: the length of the RoPE tables and the most a KV cache can hold."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    norm_eps: float = 1e-5
    """Epsilon of every RMSNorm."""
    tie_embeddings: bool = False
    """Use the input embedding matrix as the output projection (one tensor, not a copy)."""
    init: InitScheme = InitScheme.normal
    """Weight initialisation scheme, applied when a model is built from scratch."""
    init_std: float = 0.02
    """Standard deviation of the ``normal`` scheme, and of the embeddings under every scheme but ``small``."""

    # -- Architecture variants of the Llama family. Defaults are Llama's; each imported family
    # (orchestra/model/families/) sets the ones it differs in, so one model file computes them all.
    family: str = "llama"
    """Hugging Face family this shape is written back as (families/): llama, mistral, qwen2, qwen3,
    gemma, gemma2, gemma3, phi3. It names the export format only; the fields below fix the math."""
    head_dim: int | None = None
    """Width of one attention head; None is dim // n_heads (Qwen3 and Gemma set their own)."""
    qkv_bias: bool = False
    """Biases on the q/k/v projections (Qwen2)."""
    o_bias: bool = False
    """Bias on the attention output projection."""
    mlp_bias: bool = False
    """Biases on the MLP projections."""
    qk_norm: bool = False
    """RMSNorm each query and key head before RoPE (Qwen3, Gemma 3)."""
    norm_offset: float = 0.0
    """RMSNorm applies (norm_offset + weight): 0 for Llama, 1 for Gemma, whose stored gains are w - 1
    (and which multiplies by the gain in fp32 before casting back)."""
    activation: Activation = Activation.silu
    """Gate nonlinearity of the MLP: silu (SwiGLU) or gelu_tanh (GeGLU)."""
    scale_embeddings: bool = False
    """Multiply the input embeddings by sqrt(dim) (Gemma)."""
    attn_scale: float | None = None
    """Softmax scale of attention scores; None is 1/sqrt(head_dim) (Gemma: query_pre_attn_scalar**-0.5)."""
    attn_softcap: float | None = None
    """Soft-cap attention scores to (-c, c) with c * tanh(s / c) (Gemma 2)."""
    final_softcap: float | None = None
    """Soft-cap the output logits the same way (Gemma 2); the loss sees the capped logits."""
    sandwich_norm: bool = False
    """Also RMSNorm each sublayer's output before the residual add (Gemma 2/3's post-attention and
    post-feedforward norms)."""
    sliding_window: int | None = None
    """Windowed layers let a token see itself and the sliding_window - 1 tokens before it; None: full."""
    global_every: int = 0
    """With a window: every global_every-th layer (1-based) attends fully, the rest use the window
    (Gemma 2: 2, Gemma 3: 6); 0 means every layer is windowed (Mistral, Phi-3)."""
    rope: RopeScaling = field(default_factory=RopeScaling)
    """RoPE frequency scaling (Llama 3.1 llama3, yarn, dynamic NTK, Phi-3 longrope)."""
    rope_local_theta: float | None = None
    """RoPE base of the windowed layers, unscaled (Gemma 3's local layers); None: every layer uses
    rope_theta and rope."""
    kernels: KernelBackend = KernelBackend.auto
    """Which implementation of the fusable ops to use: torch, Triton, or auto (Triton where it can run)."""
    attention: AttentionImpl = AttentionImpl.auto
    """How attention runs: auto, sdpa, flex (FlexAttention block masks) or repeat_kv (the
    reference); all give the same outputs, see orchestra/model/flex.py."""
    sdpa_backend: SdpaBackend = SdpaBackend.auto
    """The SDPA kernel to prefer on CUDA: auto (torch's order: flash, efficient, math, cudnn),
    cudnn, flash, efficient or math. Ignored off CUDA."""
    path: str | None = None
    """model=hf: a pretrained Hugging Face folder (or Orchestra checkpoint) whose shape replaces the
    fields above; the same as finetune.init_from."""

    @property
    def head_size(self) -> int:
        """The width of one attention head: ``head_dim``, or dim // n_heads when that is None."""
        return self.head_dim if self.head_dim is not None else self.dim // self.n_heads

    def is_windowed(self, layer: int) -> bool:
        """Whether decoder layer ``layer`` (0-based) attends through the sliding window."""
        if self.sliding_window is None:
            return False
        return self.global_every == 0 or (layer + 1) % self.global_every != 0

    def validate(self, prefix: str = "model") -> None:
        """Raise :class:`ConfigError` naming ``prefix.key`` for a shape the model cannot be built with."""
        for key in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len", "pad_vocab_to"):
            value = getattr(self, key)
            require(value > 0, f"{prefix}.{key}", f"must be a positive integer, got {value}")
        require(
            self.head_dim is not None or self.dim % self.n_heads == 0,
            f"{prefix}.dim",
            f"{self.dim} is not divisible by n_heads={self.n_heads} (or set head_dim)",
        )
        require(self.head_dim is None or self.head_dim > 0, f"{prefix}.head_dim", "must be positive or null")
        require(
            self.n_heads % self.n_kv_heads == 0,
            f"{prefix}.n_kv_heads",
            f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}",
        )
        require(
            self.head_size % 2 == 0, f"{prefix}.head_dim", f"head_dim={self.head_size} must be even for RoPE"
        )
        require(
            self.vocab_size is None or self.vocab_size > 0, f"{prefix}.vocab_size", "must be positive or null"
        )
        require(self.rope_theta > 0, f"{prefix}.rope_theta", "must be positive")
        require(self.norm_eps > 0, f"{prefix}.norm_eps", "must be positive")
        require(self.init_std > 0, f"{prefix}.init_std", "must be positive")
        for key in ("attn_scale", "attn_softcap", "final_softcap", "sliding_window"):
            value = getattr(self, key)
            require(value is None or value > 0, f"{prefix}.{key}", f"must be positive or null, got {value}")
        require(self.global_every >= 0, f"{prefix}.global_every", "must be >= 0")
        require(
            self.rope_local_theta is None or self.rope_local_theta > 0,
            f"{prefix}.rope_local_theta",
            "must be positive or null",
        )
        self._validate_rope(f"{prefix}.rope")

    def _validate_rope(self, prefix: str) -> None:
        r = self.rope
        kind = RopeType(r.type)
        if kind == RopeType.default:
            return
        if kind != RopeType.longrope or r.factor is not None:
            require(
                r.factor is not None and r.factor > 0,
                f"{prefix}.factor",
                f"rope type {kind.value} needs a positive factor",
            )
        original = r.original_max_seq_len
        require(
            original is None or original > 0, f"{prefix}.original_max_seq_len", "must be positive or null"
        )
        if kind == RopeType.llama3:
            require(
                r.high_freq_factor > r.low_freq_factor > 0,
                f"{prefix}.high_freq_factor",
                f"llama3 needs high_freq_factor > low_freq_factor > 0, got {r.high_freq_factor}, {r.low_freq_factor}",
            )
        if kind == RopeType.longrope:
            half = self.head_size // 2
            for key in ("short_factor", "long_factor"):
                value = getattr(r, key)
                require(
                    value is not None and len(value) == half,
                    f"{prefix}.{key}",
                    f"longrope needs {half} factors (head_dim / 2), got {None if value is None else len(value)}",
                )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
        """Rebuild a config from its plain form (checkpoint metadata); unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"model config has unknown keys {sorted(unknown)}; known: {sorted(known)}")
        kw = dict(d)
        if "init" in kw:
            kw["init"] = InitScheme(kw["init"])
        if "kernels" in kw:
            kw["kernels"] = KernelBackend(kw["kernels"])
        if "activation" in kw:
            kw["activation"] = Activation(kw["activation"])
        if "attention" in kw:
            kw["attention"] = AttentionImpl(kw["attention"])
        if "sdpa_backend" in kw:
            kw["sdpa_backend"] = SdpaBackend(kw["sdpa_backend"])
        if isinstance(kw.get("rope"), Mapping):
            rope = dict(kw["rope"])
            known_rope = {f.name for f in fields(RopeScaling)}
            if set(rope) - known_rope:
                raise ConfigError(f"model config rope has unknown keys {sorted(set(rope) - known_rope)}")
            rope["type"] = RopeType(rope.get("type", "default"))
            for key in ("short_factor", "long_factor"):
                if rope.get(key) is not None:
                    rope[key] = [float(v) for v in rope[key]]
            kw["rope"] = RopeScaling(**rope)
        return cls(**kw)


def validate_model(m: ModelConfig, prefix: str = "model") -> None:
    """Same as ``m.validate(prefix)``; kept for existing callers."""
    m.validate(prefix)


def model_config_from_dict(d: Mapping[str, Any]) -> ModelConfig:
    """Same as :meth:`ModelConfig.from_dict`; kept for existing callers."""
    return ModelConfig.from_dict(d)
