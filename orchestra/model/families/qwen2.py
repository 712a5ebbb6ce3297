"""Qwen2 / Qwen2.5 (``Qwen2ForCausalLM``): Llama with biases on the q, k and v projections
(always built by transformers' Qwen2, never on o_proj)."""

from __future__ import annotations

from typing import Any

from orchestra.model.config import ModelConfig
from orchestra.model.families.llama import SILU
from orchestra.model.families.spec import (
    Family,
    HFConfig,
    HFImportError,
    activation,
    build,
    common_fields,
    common_keys,
    layer_types,
    window_pattern,
)

DEFAULTS = {"max_position_embeddings": 32768, "rms_norm_eps": 1e-6}


def sliding(config: HFConfig, n_layers: int) -> tuple[int | None, int]:
    """Qwen's window: only with use_sliding_window, on the layers from max_window_layers on."""
    if not config.get("use_sliding_window"):
        return None, 0
    start = config.get("max_window_layers", 28)
    if start != 0 and start < n_layers:
        raise HFImportError(
            f"config.json: use_sliding_window=true with max_window_layers={start} (the first {start} layers full, "
            "the rest windowed) is not supported; only every layer windowed (max_window_layers=0) is"
        )
    if start >= n_layers:
        return None, 0
    return window_pattern(config, config.get("sliding_window"), n_layers)


def read_common(config: HFConfig, family: str) -> dict[str, Any]:
    kw = common_fields(config, DEFAULTS, family)
    activation(config, "hidden_act", "silu", SILU)
    window, every = sliding(config, kw["n_layers"])
    return {**kw, "sliding_window": window, "global_every": every}


def read(config: HFConfig) -> ModelConfig:
    return build({**read_common(config, "qwen2"), "qkv_bias": True})


def write_common(cfg: ModelConfig, family: Family) -> dict[str, Any]:
    windowed = cfg.sliding_window is not None
    if windowed and cfg.global_every:
        raise ValueError(f"{family.architecture} windows every layer or none; global_every must be 0")
    return {
        **common_keys(cfg, family),
        "hidden_act": "silu",
        "use_sliding_window": windowed,
        "sliding_window": cfg.sliding_window,
        "max_window_layers": 0 if windowed else cfg.n_layers,
        "layer_types": layer_types(cfg),
    }


def write(cfg: ModelConfig) -> dict[str, Any]:
    if not cfg.qkv_bias or cfg.o_bias or cfg.mlp_bias:
        raise ValueError("Qwen2 has q/k/v biases and no others")
    return write_common(cfg, FAMILY)


FAMILY = Family("qwen2", "Qwen2ForCausalLM", "qwen2", read, write)
