"""Phi-3 / Phi-3.5 (``Phi3ForCausalLM``): Llama with q/k/v fused into one ``qkv_proj`` and gate/up
into one ``gate_up_proj`` (split on import, fused again on export), LongRoPE ("su") scaling and an
optional sliding window in every layer."""

from __future__ import annotations

from typing import Any

from orchestra.model.config import ModelConfig, RopeType
from orchestra.model.families.llama import SILU
from orchestra.model.families.spec import (
    LLAMA_LAYER_NAMES,
    Family,
    HFConfig,
    activation,
    build,
    common_fields,
    common_keys,
    positive_int,
    refuse_if,
)

DEFAULTS = {"max_position_embeddings": 4096, "rms_norm_eps": 1e-5}
FUSED = {
    "self_attn.qkv_proj": ("attention.q_proj", "attention.k_proj", "attention.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}


def read(config: HFConfig) -> ModelConfig:
    rope = config.get("rope_scaling") or config.get("rope_parameters")
    if isinstance(rope, dict) and rope.get("type", rope.get("rope_type")) in ("su", "yarn"):
        # Phi3Config's own rule: "su" (and its "yarn") are LongRoPE.
        rope = {**rope, "rope_type": "longrope"}
        rope.pop("type", None)
        config = {**config, "rope_scaling": rope, "rope_parameters": None}
    kw = common_fields(config, DEFAULTS, "phi3")
    activation(config, "hidden_act", "silu", SILU)
    refuse_if(
        kw["rope"].type not in (RopeType.default, RopeType.longrope),
        "rope_scaling.type",
        kw["rope"].type.value,
        "Phi-3 uses default or longrope RoPE",
    )
    if kw["rope"].type == RopeType.longrope:
        kw["rope"].original_max_seq_len = positive_int(config, "original_max_position_embeddings", 4096)
    return build({**kw, "sliding_window": config.get("sliding_window")})


def write(cfg: ModelConfig) -> dict[str, Any]:
    if cfg.qkv_bias or cfg.o_bias or cfg.mlp_bias or cfg.qk_norm or cfg.global_every:
        raise ValueError("Phi-3 has no biases, no q/k norms and windows every layer or none")
    keys = {**common_keys(cfg, FAMILY), "hidden_act": "silu", "sliding_window": cfg.sliding_window}
    if RopeType(cfg.rope.type) == RopeType.longrope:
        keys["original_max_position_embeddings"] = cfg.rope.original_max_seq_len
    return keys


FAMILY = Family(
    "phi3",
    "Phi3ForCausalLM",
    "phi3",
    read,
    write,
    layer_names={
        k: v for k, v in LLAMA_LAYER_NAMES.items() if not any(k in parts for parts in FUSED.values())
    },
    fused=FUSED,
)
