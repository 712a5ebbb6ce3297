"""Gemma 3 text (``Gemma3ForCausalLM``, e.g. gemma-3-1b): Gemma 2's blocks without soft-caps, plus
per-head q/k norms and five windowed layers for every global one, each kind with its own RoPE
(the local layers unscaled with ``rope_local_base_freq``, the global ones possibly scaled)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from orchestra.model.config import ModelConfig, RopeScaling, RopeType
from orchestra.model.families.gemma import gemma_fields, gemma_keys
from orchestra.model.families.gemma2 import LAYER_NAMES, _cap
from orchestra.model.families.spec import (
    Family,
    HFConfig,
    HFImportError,
    build,
    layer_types,
    positive_int,
    refuse_if,
    rope_keys,
    window_pattern,
)


def _split_rope(config: HFConfig) -> tuple[dict[str, Any], float]:
    """(config with the global layers' RoPE only, the local layers' theta)."""
    params = config.get("rope_parameters")
    local_theta = config.get("rope_local_base_freq", 10000.0)
    out = dict(config)
    if isinstance(params, Mapping) and ("full_attention" in params or "sliding_attention" in params):
        local = dict(params.get("sliding_attention") or {})
        kind = local.get("rope_type", local.get("type", "default"))
        refuse_if(
            kind != "default", "rope_parameters.sliding_attention.rope_type", kind, "local RoPE is unscaled"
        )
        local_theta = local.get("rope_theta", local_theta)
        out["rope_parameters"] = dict(params.get("full_attention") or {"rope_type": "default"})
        out.setdefault("rope_theta", 1000000.0)
    return out, float(local_theta)


def read(config: HFConfig) -> ModelConfig:
    refuse_if(
        bool(config.get("use_bidirectional_attention")),
        "use_bidirectional_attention",
        True,
        "our attention is causal",
    )
    config, local_theta = _split_rope({"rope_theta": 1000000.0, **config})
    kw = gemma_fields(config, "gemma3", "hidden_activation")
    scalar = positive_int(config, "query_pre_attn_scalar", 256)
    window = config.get("sliding_window", 4096)
    pattern = config.get("sliding_window_pattern", 6)
    types = config.get("layer_types") or [
        "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(kw["n_layers"])
    ]
    if window is None:
        raise HFImportError("config.json: sliding_window=None; Gemma 3's local layers need a window")
    window, every = window_pattern({"layer_types": types}, window, kw["n_layers"])
    return build(
        {
            **kw,
            "qk_norm": True,
            "attn_scale": float(scalar) ** -0.5,
            "attn_softcap": _cap(config, "attn_logit_softcapping", None),
            "final_softcap": _cap(config, "final_logit_softcapping", None),
            "sandwich_norm": True,
            "sliding_window": window,
            "global_every": every,
            "rope_local_theta": local_theta,
        }
    )


def write(cfg: ModelConfig) -> dict[str, Any]:
    if not (cfg.sandwich_norm and cfg.qk_norm and cfg.sliding_window and cfg.rope_local_theta):
        raise ValueError("Gemma 3 has sandwich norms, q/k norms, a window and a local RoPE theta")
    scale = cfg.attn_scale if cfg.attn_scale is not None else cfg.head_size**-0.5
    scalar = scale**-2
    keys = gemma_keys(cfg, FAMILY)
    local = rope_keys(replace_rope(cfg))["rope_parameters"]
    keys.pop("rope_scaling", None)
    keys.update(
        hidden_activation="gelu_pytorch_tanh",
        query_pre_attn_scalar=round(scalar) if abs(scalar - round(scalar)) < 1e-6 else scalar,
        attn_logit_softcapping=cfg.attn_softcap,
        final_logit_softcapping=cfg.final_softcap,
        sliding_window=cfg.sliding_window,
        layer_types=layer_types(cfg),
        rope_parameters={"full_attention": keys["rope_parameters"], "sliding_attention": local},
        rope_local_base_freq=cfg.rope_local_theta,
    )
    return keys


def replace_rope(cfg: ModelConfig) -> ModelConfig:
    from dataclasses import replace

    assert cfg.rope_local_theta is not None
    return replace(cfg, rope_theta=cfg.rope_local_theta, rope=RopeScaling(type=RopeType.default))


FAMILY = Family("gemma3", "Gemma3ForCausalLM", "gemma3_text", read, write, layer_names=LAYER_NAMES)
