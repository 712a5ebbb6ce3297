"""Gemma 2 (``Gemma2ForCausalLM``): Gemma with sandwich norms (post-attention and post-feedforward),
soft-capped attention scores and logits, query_pre_attn_scalar as the attention scale, and sliding
windows on alternate layers (the first of each pair)."""

from __future__ import annotations

from typing import Any

from orchestra.model.config import ModelConfig
from orchestra.model.families.gemma import gemma_fields, gemma_keys
from orchestra.model.families.spec import (
    LLAMA_LAYER_NAMES,
    Family,
    HFConfig,
    build,
    layer_types,
    positive_int,
    window_pattern,
)

# Gemma 2 renames the norms: its post_attention_layernorm norms the attention output, and the
# pre-MLP norm is pre_feedforward_layernorm.
LAYER_NAMES = {
    **LLAMA_LAYER_NAMES,
    "mlp_norm": "pre_feedforward_layernorm",
    "attention_post_norm": "post_attention_layernorm",
    "mlp_post_norm": "post_feedforward_layernorm",
}


def _cap(config: HFConfig, key: str, default: float | None) -> float | None:
    value = config.get(key, default)
    return None if value is None else float(value)


def read(config: HFConfig) -> ModelConfig:
    kw = gemma_fields(config, "gemma2", "hidden_activation")
    scalar = positive_int(config, "query_pre_attn_scalar", 256)
    window = config.get("sliding_window", 4096)
    types = config.get("layer_types") or [
        "sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(kw["n_layers"])
    ]
    window, every = window_pattern({"layer_types": types}, window, kw["n_layers"])
    return build(
        {
            **kw,
            "attn_scale": float(scalar) ** -0.5,
            "attn_softcap": _cap(config, "attn_logit_softcapping", 50.0),
            "final_softcap": _cap(config, "final_logit_softcapping", 30.0),
            "sandwich_norm": True,
            "sliding_window": window,
            "global_every": every,
        }
    )


def write(cfg: ModelConfig) -> dict[str, Any]:
    if not cfg.sandwich_norm:
        raise ValueError("Gemma 2 has sandwich norms")
    scale = cfg.attn_scale if cfg.attn_scale is not None else cfg.head_size**-0.5
    return {
        **gemma_keys(cfg, FAMILY),
        "hidden_activation": "gelu_pytorch_tanh",
        # An int in Gemma2Config; a scale that is no integer's inverse root is written as is.
        "query_pre_attn_scalar": round(scale**-2) if abs(scale**-2 - round(scale**-2)) < 1e-6 else scale**-2,
        "attn_logit_softcapping": cfg.attn_softcap,
        "final_logit_softcapping": cfg.final_softcap,
        # A full-context window where there is none: Gemma2Config always has one.
        "sliding_window": cfg.sliding_window or cfg.max_seq_len,
        "layer_types": layer_types(cfg) if cfg.sliding_window else ["full_attention"] * cfg.n_layers,
    }


FAMILY = Family("gemma2", "Gemma2ForCausalLM", "gemma2", read, write, layer_names=LAYER_NAMES)
