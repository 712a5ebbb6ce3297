"""Mistral and Mistral-Nemo (``MistralForCausalLM``): Llama with sliding-window attention in every
layer (computed, not ignored) and, for Nemo, a head_dim apart from hidden_size / heads."""

from __future__ import annotations

from typing import Any

from orchestra.model.config import ModelConfig
from orchestra.model.families.llama import SILU
from orchestra.model.families.spec import Family, HFConfig, activation, build, common_fields, common_keys

# transformers' MistralConfig defaults, for keys a hand-written config.json leaves out.
DEFAULTS = {"max_position_embeddings": 4096 * 32, "rms_norm_eps": 1e-6}


def read(config: HFConfig) -> ModelConfig:
    kw = common_fields(config, DEFAULTS, "mistral")
    activation(config, "hidden_act", "silu", SILU)
    # MistralConfig defaults sliding_window to 4096 when the key is absent; null means none.
    return build({**kw, "sliding_window": config.get("sliding_window", 4096)})


def write(cfg: ModelConfig) -> dict[str, Any]:
    if cfg.sliding_window is not None and cfg.global_every:
        raise ValueError("Mistral windows every layer; global_every must be 0")
    return {**common_keys(cfg, FAMILY), "hidden_act": "silu", "sliding_window": cfg.sliding_window}


FAMILY = Family("mistral", "MistralForCausalLM", "mistral", read, write)
