"""Qwen3 (``Qwen3ForCausalLM``): Llama with per-head q/k RMSNorm before RoPE and its own head_dim."""

from __future__ import annotations

from typing import Any

from orchestra.model.config import ModelConfig
from orchestra.model.families.qwen2 import read_common, write_common
from orchestra.model.families.spec import Family, HFConfig, build


def read(config: HFConfig) -> ModelConfig:
    config = {"head_dim": 128, **config}  # Qwen3Config's default when the key is absent
    bias = bool(config.get("attention_bias", False))
    return build({**read_common(config, "qwen3"), "qk_norm": True, "qkv_bias": bias, "o_bias": bias})


def write(cfg: ModelConfig) -> dict[str, Any]:
    if not cfg.qk_norm or cfg.qkv_bias != cfg.o_bias or cfg.mlp_bias:
        raise ValueError("Qwen3 has q/k norms and one attention_bias for q/k/v/o")
    return {**write_common(cfg, FAMILY), "attention_bias": cfg.qkv_bias}


FAMILY = Family("qwen3", "Qwen3ForCausalLM", "qwen3", read, write)
