"""Gemma 1 (``GemmaForCausalLM``): Llama with (1 + w) RMSNorm gains, GeGLU (gelu-tanh), input
embeddings scaled by sqrt(hidden_size), head_dim 256 and tied embeddings by default."""

from __future__ import annotations

from typing import Any

from orchestra.model.config import Activation, ModelConfig
from orchestra.model.families.spec import (
    Family,
    HFConfig,
    activation,
    build,
    common_fields,
    common_keys,
    no_windows,
)

DEFAULTS = {
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-6,
    "head_dim": 256,
    "tie_word_embeddings": True,
}
# transformers maps Gemma's legacy "gelu" to the tanh approximation the weights were trained with.
GELU_TANH = {"gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu_tanh", "gelu_new": "gelu_tanh"}


def gemma_fields(config: HFConfig, family: str, act_key: str) -> dict[str, Any]:
    config = {"tie_word_embeddings": True, **config}
    kw = common_fields(config, DEFAULTS, family)
    if kw["head_dim"] is None:
        kw["head_dim"] = kw["dim"] // kw["n_heads"]
    act = activation(config, act_key, "gelu_pytorch_tanh", GELU_TANH)
    bias = bool(config.get("attention_bias", False))
    return {
        **kw,
        "activation": Activation(act),
        "norm_offset": 1.0,
        "scale_embeddings": True,
        "qkv_bias": bias,
        "o_bias": bias,
    }


def read(config: HFConfig) -> ModelConfig:
    no_windows(config, "Gemma")
    return build(gemma_fields(config, "gemma", "hidden_act"))


def gemma_keys(cfg: ModelConfig, family: Family) -> dict[str, Any]:
    if (
        cfg.norm_offset != 1.0
        or not cfg.scale_embeddings
        or Activation(cfg.activation) != Activation.gelu_tanh
    ):
        raise ValueError(f"{family.architecture} needs norm_offset=1, scale_embeddings and gelu_tanh")
    if cfg.qkv_bias != cfg.o_bias or cfg.mlp_bias:
        raise ValueError(f"{family.architecture} has one attention_bias for q/k/v/o and no MLP bias")
    return {**common_keys(cfg, family), "attention_bias": cfg.qkv_bias}


def write(cfg: ModelConfig) -> dict[str, Any]:
    if cfg.attn_softcap or cfg.final_softcap or cfg.sandwich_norm or cfg.sliding_window or cfg.attn_scale:
        raise ValueError("Gemma 1 has no soft-caps, sandwich norms, windows or attention scale; use gemma2")
    return {**gemma_keys(cfg, FAMILY), "hidden_act": "gelu_pytorch_tanh"}


FAMILY = Family("gemma", "GemmaForCausalLM", "gemma", read, write)
