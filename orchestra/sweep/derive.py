"""What a trial's sampled values imply for the rest of its config, so trials compare fairly.

Architecture search changes the model's size, so a fixed step count would give bigger models
more compute. Under ``budget.tokens`` every trial sees the same number of tokens (its
``trainer.max_steps`` is the budget over its tokens per step, so batch size can be searched
too); under ``budget.flops`` every trial spends the same training FLOPs (6N + attention per
token, :func:`orchestra.train.flops.model_flops_per_token`): a bigger model sees fewer tokens.
With ``head_dim`` set, ``model.n_heads`` follows ``model.dim`` (and ``n_kv_heads`` keeps the base
config's grouping); ``arch.ffn_ratio`` sets ``model.ffn_dim`` to ratio x dim, rounded up to
``ffn_multiple_of``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from orchestra.config import ConfigError, ModelConfig, padded_vocab_size


@dataclass
class Budget:
    """The compute every trial gets; at most one of the two."""

    tokens: int | None = None
    """Training tokens per trial: trainer.max_steps = tokens / (global_batch_size x max_seq_len)."""
    flops: float | None = None
    """Training FLOPs per trial: tokens = flops / (the trial model's FLOPs per token)."""


@dataclass
class DeriveConfig:
    """How sampled architecture values become schema values."""

    head_dim: int | None = None
    """model.n_heads = model.dim / head_dim (dim must divide); None: n_heads as configured."""
    ffn_multiple_of: int = 64
    """arch.ffn_ratio's model.ffn_dim is rounded up to a multiple of this."""
    budget: Budget = field(default_factory=Budget)


def derived_overrides(config: dict[str, Any], sampled: dict[str, Any], cfg: DeriveConfig) -> dict[str, Any]:
    """Schema values implied by ``sampled`` on the composed trial ``config`` (a plain dict)."""
    model = dict(config.get("model") or {})
    trainer = dict(config.get("trainer") or {})
    out: dict[str, Any] = {}
    dim = int(model.get("dim", 0))
    if cfg.head_dim is not None:
        if dim % cfg.head_dim:
            raise ConfigError(f"sweep: model.dim={dim} is not a multiple of head_dim={cfg.head_dim}")
        n_heads = dim // cfg.head_dim
        base_heads, base_kv = int(model.get("n_heads", 1)), int(model.get("n_kv_heads", 1) or 1)
        groups = max(1, base_heads // base_kv) if base_heads % base_kv == 0 else 1
        while n_heads % groups:
            groups -= 1
        out["model.n_heads"] = n_heads
        out["model.n_kv_heads"] = n_heads // groups
        model.update(n_heads=n_heads, n_kv_heads=n_heads // groups)
    if "arch.ffn_ratio" in sampled:
        ffn = float(sampled["arch.ffn_ratio"]) * dim
        multiple = max(1, cfg.ffn_multiple_of)
        out["model.ffn_dim"] = int(math.ceil(ffn / multiple) * multiple)
        model["ffn_dim"] = out["model.ffn_dim"]
    b = cfg.budget
    if b.tokens is not None and b.flops is not None:
        raise ConfigError("sweep: budget: set tokens or flops, not both")
    if b.tokens is not None or b.flops is not None:
        seq_len = int(model.get("max_seq_len", 0))
        batch = int(trainer.get("global_batch_size", 0))
        if seq_len <= 0 or batch <= 0:
            raise ConfigError(
                "sweep: budget: the trial config has no model.max_seq_len or trainer.global_batch_size"
            )
        tokens = (
            float(b.tokens) if b.tokens is not None else float(b.flops or 0) / flops_per_token(model, config)
        )
        out["trainer.max_steps"] = max(1, round(tokens / (batch * seq_len)))
    return out


def flops_per_token(model: dict[str, Any], config: dict[str, Any]) -> float:
    """Training FLOPs per token of the trial's model (vocabulary from the model or the data config)."""
    from orchestra.train.flops import model_flops_per_token

    m = ModelConfig.from_dict({k: v for k, v in model.items() if v is not None})
    tokenizer_vocab = m.vocab_size or int((config.get("data") or {}).get("vocab_size") or 0)
    if tokenizer_vocab <= 0:
        raise ConfigError("sweep: budget.flops needs model.vocab_size or data.vocab_size")
    # The rows the run builds (padded to model.pad_vocab_to), as its MFU counts them.
    return model_flops_per_token(m, padded_vocab_size(m, tokenizer_vocab), m.max_seq_len)
