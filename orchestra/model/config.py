"""The model's configuration: shape and numerics of the decoder, and the rules they must obey.

It lives next to the model so that model/ depends on nothing above it; orchestra.config
re-exports these names for the Hydra schema. Standard library only (no torch, no Hydra), so
importing the configuration stays cheap.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
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


class KernelBackend(str, Enum):
    """Where the fusable ops run; the selection rules are in orchestra/model/ops.py."""

    auto = "auto"
    torch = "torch"
    triton = "triton"


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
    kernels: KernelBackend = KernelBackend.auto
    """Which implementation of the fusable ops to use: torch, Triton, or auto (Triton where it can run)."""
    path: str | None = None
    """model=hf: a pretrained Hugging Face folder (or Orchestra checkpoint) whose shape replaces the
    fields above; the same as finetune.init_from."""

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def validate(self, prefix: str = "model") -> None:
        """Raise :class:`ConfigError` naming ``prefix.key`` for a shape the model cannot be built with."""
        for key in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len", "pad_vocab_to"):
            value = getattr(self, key)
            require(value > 0, f"{prefix}.{key}", f"must be a positive integer, got {value}")
        require(
            self.dim % self.n_heads == 0,
            f"{prefix}.dim",
            f"{self.dim} is not divisible by n_heads={self.n_heads}",
        )
        require(
            self.n_heads % self.n_kv_heads == 0,
            f"{prefix}.n_kv_heads",
            f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}",
        )
        require(self.head_dim % 2 == 0, f"{prefix}.dim", f"head_dim={self.head_dim} must be even for RoPE")
        require(
            self.vocab_size is None or self.vocab_size > 0, f"{prefix}.vocab_size", "must be positive or null"
        )
        require(self.rope_theta > 0, f"{prefix}.rope_theta", "must be positive")
        require(self.norm_eps > 0, f"{prefix}.norm_eps", "must be positive")
        require(self.init_std > 0, f"{prefix}.init_std", "must be positive")

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
        return cls(**kw)


def validate_model(m: ModelConfig, prefix: str = "model") -> None:
    """Same as ``m.validate(prefix)``; kept for existing callers."""
    m.validate(prefix)


def model_config_from_dict(d: Mapping[str, Any]) -> ModelConfig:
    """Same as :meth:`ModelConfig.from_dict`; kept for existing callers."""
    return ModelConfig.from_dict(d)
