"""Llama 1/2/3/3.1/3.2/3.3 (``LlamaForCausalLM``): the reference architecture, plus optional biases
and every RoPE scaling (llama3, linear, dynamic NTK, yarn) and an explicit head_dim."""

from __future__ import annotations

from typing import Any

from orchestra.model.config import ModelConfig
from orchestra.model.families.spec import (
    Family,
    HFConfig,
    activation,
    build,
    common_fields,
    common_keys,
    no_windows,
)

DEFAULTS = {"max_position_embeddings": 2048, "rms_norm_eps": 1e-6}
SILU = {"silu": "silu", "swish": "silu"}


def read(config: HFConfig) -> ModelConfig:
    kw = common_fields(config, DEFAULTS, "llama")
    activation(config, "hidden_act", "silu", SILU)
    bias = bool(config.get("attention_bias", False))
    no_windows(config, "Llama")
    return build({**kw, "qkv_bias": bias, "o_bias": bias, "mlp_bias": bool(config.get("mlp_bias", False))})


def write(cfg: ModelConfig) -> dict[str, Any]:
    if cfg.qkv_bias != cfg.o_bias:
        raise ValueError("a Llama config has one attention_bias for q/k/v and o; qkv_bias != o_bias")
    return {
        **common_keys(cfg, FAMILY),
        "hidden_act": "silu",
        "attention_bias": cfg.qkv_bias,
        "mlp_bias": cfg.mlp_bias,
    }


FAMILY = Family("llama", "LlamaForCausalLM", "llama", read, write)
