"""What a model family is: the Hugging Face side of one architecture, as data plus two functions.

The model computes every family with one :class:`~orchestra.model.transformer.Transformer`; the
differences are :class:`ModelConfig` fields. A :class:`Family` says how a family's config.json
maps onto those fields (``read``) and back (``write``), how its tensors are named, and which
of them transformers stores fused (Phi-3's qkv_proj). The helpers below read the keys every
family shares, so a family file holds only what is its own.

Everything that would change the math and that we do not compute is refused with an
:class:`HFImportError` naming the config key and value, rather than loaded into a model that
would silently give different logits.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from orchestra.model.config import ModelConfig, RopeScaling, RopeType

HFConfig = Mapping[str, Any]


class HFImportError(ValueError):
    """A Hugging Face folder we cannot load exactly; the message names the key, tensor or file."""


# Per-layer module names shared by the Llama-derived families: ours -> transformers'.
LLAMA_LAYER_NAMES: dict[str, str] = {
    "attention_norm": "input_layernorm",
    "attention.q_proj": "self_attn.q_proj",
    "attention.k_proj": "self_attn.k_proj",
    "attention.v_proj": "self_attn.v_proj",
    "attention.o_proj": "self_attn.o_proj",
    "attention.q_norm": "self_attn.q_norm",
    "attention.k_norm": "self_attn.k_norm",
    "mlp_norm": "post_attention_layernorm",
    "mlp.gate_proj": "mlp.gate_proj",
    "mlp.up_proj": "mlp.up_proj",
    "mlp.down_proj": "mlp.down_proj",
}


@dataclass(frozen=True)
class Family:
    """One Hugging Face architecture: config translation, tensor names, fused tensors."""

    name: str
    """ModelConfig.family value."""
    architecture: str
    """The causal-LM class name written to config.json (``Qwen2ForCausalLM``)."""
    model_type: str
    read: Callable[[HFConfig], ModelConfig]
    """config.json -> ModelConfig (with vocab_size set); refuses what it cannot compute."""
    write: Callable[[ModelConfig], dict[str, Any]]
    """ModelConfig -> the family's config.json keys (shape, rope, variants)."""
    layer_names: Mapping[str, str] = field(default_factory=lambda: dict(LLAMA_LAYER_NAMES))
    """Our per-layer module path -> transformers' (under ``model.layers.{i}.``)."""
    fused: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """transformers' fused module -> our modules concatenated (along the output dim) in it."""

    @property
    def classifier_architecture(self) -> str:
        return self.architecture.replace("ForCausalLM", "ForSequenceClassification")


def positive_int(config: HFConfig, key: str, default: int | None = None) -> int:
    value = config.get(key, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise HFImportError(f"config.json: {key}={value!r}; expected a positive integer")
    return value


def refuse_if(condition: bool, key: str, value: Any, reason: str) -> None:
    if condition:
        raise HFImportError(f"config.json: {key}={value!r} is not supported: {reason}")


def rope_scaling(config: HFConfig, max_pos: int) -> tuple[float, RopeScaling]:
    """(rope theta, scaling) from ``rope_parameters`` (transformers 5) or ``rope_theta`` + ``rope_scaling`` (4.x).

    Refuses partial rotary embeddings and per-layer-type RoPE, which our model does not compute.
    """
    theta = config.get("rope_theta")
    partial = config.get("partial_rotary_factor", 1.0)
    refuse_if(partial not in (None, 1.0), "partial_rotary_factor", partial, "our RoPE rotates the whole head")
    params: dict[str, Any] = {}
    for key in ("rope_scaling", "rope_parameters"):
        given = config.get(key)
        if given is None:
            continue
        if not isinstance(given, Mapping):
            raise HFImportError(f"config.json: {key}={given!r} is not a dict")
        if (
            "rope_type" not in given
            and "type" not in given
            and given
            and all(isinstance(v, Mapping) for v in given.values())
        ):
            raise HFImportError(
                f"config.json: {key} is given per layer type ({sorted(given)}); only one RoPE for all layers is supported"
            )
        params.update(given)
    partial = params.get("partial_rotary_factor", 1.0)
    refuse_if(
        partial not in (None, 1.0),
        "rope_parameters.partial_rotary_factor",
        partial,
        "our RoPE rotates the whole head",
    )
    if params.get("rope_theta") is not None:
        theta = params["rope_theta"]  # transformers 5 gives rope_parameters precedence
    kind_name = params.get("rope_type", params.get("type", "default"))
    try:
        kind = RopeType(kind_name)
    except ValueError:
        accepted = ", ".join(t.value for t in RopeType)
        raise HFImportError(
            f"config.json: rope_parameters.rope_type={kind_name!r} is not supported (accepted: {accepted})"
        ) from None
    original = params.get("original_max_position_embeddings", config.get("original_max_position_embeddings"))
    if kind == RopeType.dynamic:
        original = max_pos  # dynamic NTK scales beyond max_position_embeddings itself

    def num(key: str) -> float | None:
        value = params.get(key)
        return None if value is None else float(value)

    scaling = RopeScaling(
        type=kind,
        factor=num("factor"),
        original_max_seq_len=int(original) if original is not None and kind != RopeType.default else None,
        low_freq_factor=float(params.get("low_freq_factor") or 1.0),
        high_freq_factor=float(params.get("high_freq_factor") or 4.0),
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        mscale=num("mscale"),
        mscale_all_dim=num("mscale_all_dim"),
        truncate=bool(params.get("truncate", True)),
        attention_factor=num("attention_factor"),
        short_factor=[float(v) for v in params["short_factor"]] if params.get("short_factor") else None,
        long_factor=[float(v) for v in params["long_factor"]] if params.get("long_factor") else None,
    )
    if kind in (RopeType.llama3, RopeType.yarn, RopeType.longrope) and scaling.original_max_seq_len is None:
        scaling.original_max_seq_len = max_pos  # transformers' standardize_rope_params default
    return float(theta if theta is not None else 10000.0), scaling


def rope_keys(cfg: ModelConfig) -> dict[str, Any]:
    """config.json RoPE keys for ``cfg``: ``rope_parameters`` (transformers 5) and ``rope_theta`` (4.x)."""
    r = cfg.rope
    kind = RopeType(r.type)
    params: dict[str, Any] = {"rope_type": kind.value, "rope_theta": float(cfg.rope_theta)}
    if kind != RopeType.default:
        if r.factor is not None:
            params["factor"] = float(r.factor)
        if kind in (RopeType.llama3, RopeType.yarn, RopeType.longrope) and r.original_max_seq_len is not None:
            params["original_max_position_embeddings"] = int(r.original_max_seq_len)
    if kind == RopeType.llama3:
        params.update(low_freq_factor=r.low_freq_factor, high_freq_factor=r.high_freq_factor)
    if kind == RopeType.yarn:
        params.update(beta_fast=r.beta_fast, beta_slow=r.beta_slow, truncate=r.truncate)
        for key in ("mscale", "mscale_all_dim"):
            if getattr(r, key) is not None:
                params[key] = getattr(r, key)
    if kind in (RopeType.yarn, RopeType.longrope) and r.attention_factor is not None:
        params["attention_factor"] = r.attention_factor
    if kind == RopeType.longrope:
        params.update(short_factor=list(r.short_factor or []), long_factor=list(r.long_factor or []))
    out: dict[str, Any] = {"rope_theta": float(cfg.rope_theta), "rope_parameters": params}
    if kind != RopeType.default:
        out["rope_scaling"] = dict(params)  # what transformers 4.x reads
    return out


def max_position(cfg: ModelConfig) -> int:
    """max_position_embeddings to write: dynamic NTK's original context, else our max_seq_len."""
    if RopeType(cfg.rope.type) == RopeType.dynamic and cfg.rope.original_max_seq_len:
        return cfg.rope.original_max_seq_len
    return cfg.max_seq_len


def window_pattern(config: HFConfig, window: int | None, n_layers: int) -> tuple[int | None, int]:
    """(sliding_window, global_every) from ``layer_types`` (or all layers windowed when absent).

    Accepts the patterns our model computes: every layer full, every layer windowed, or every
    k-th layer full and the others windowed (Gemma 2: k = 2).
    """
    layer_types = config.get("layer_types")
    if window is None:
        if layer_types and any(t != "full_attention" for t in layer_types):
            raise HFImportError("config.json: layer_types names sliding layers but sliding_window is null")
        return None, 0
    if not layer_types:
        return window, 0
    if len(layer_types) != n_layers:
        raise HFImportError(f"config.json: layer_types has {len(layer_types)} entries for {n_layers} layers")
    unknown = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
    refuse_if(
        bool(unknown), "layer_types", unknown, "only full_attention and sliding_attention layers exist here"
    )
    full = [i for i, t in enumerate(layer_types) if t == "full_attention"]
    if not full:
        return window, 0
    if len(full) == n_layers:
        return None, 0
    every = full[0] + 1
    expected = [i for i in range(n_layers) if (i + 1) % every == 0]
    if full != expected:
        raise HFImportError(
            f"config.json: layer_types={layer_types} is not supported: full-attention layers must be every k-th "
            "layer (the others sliding), as in Gemma 2"
        )
    return window, every


def no_windows(config: HFConfig, family: str) -> None:
    """Refuse sliding layers in a family whose transformers class has none."""
    window, types = config.get("sliding_window"), config.get("layer_types") or []
    refuse_if(
        window is not None,
        "sliding_window",
        window,
        f"{family} has no sliding window; use the mistral family",
    )
    unknown = sorted(set(types) - {"full_attention"})
    refuse_if(bool(unknown), "layer_types", unknown, f"{family} layers attend fully")


def layer_types(cfg: ModelConfig) -> list[str]:
    return ["sliding_attention" if cfg.is_windowed(i) else "full_attention" for i in range(cfg.n_layers)]


def common_fields(config: HFConfig, defaults: Mapping[str, Any], family: str) -> dict[str, Any]:
    """ModelConfig keyword arguments read from the keys every family shares.

    ``defaults`` are the family's transformers config-class defaults for keys a hand-written
    config.json may leave out.
    """

    def get(key: str) -> Any:
        value = config.get(key)
        return defaults.get(key) if value is None else value

    dim, n_heads = positive_int(config, "hidden_size"), positive_int(config, "num_attention_heads")
    n_kv = positive_int(config, "num_key_value_heads", n_heads)
    n_layers = positive_int(config, "num_hidden_layers")
    if n_heads % n_kv:
        raise HFImportError(
            f"config.json: num_attention_heads={n_heads} is not a multiple of num_key_value_heads={n_kv}"
        )
    head_dim = config.get("head_dim", defaults.get("head_dim"))
    if head_dim is None:
        if dim % n_heads:
            raise HFImportError(
                f"config.json: hidden_size={dim} is not divisible by num_attention_heads={n_heads}"
            )
        head_dim = dim // n_heads
    head_dim = positive_int({"head_dim": head_dim}, "head_dim")
    if head_dim % 2:
        raise HFImportError(f"config.json: head_dim={head_dim} is odd; RoPE needs an even one")
    refuse_if(
        bool(config.get("quantization_config")), "quantization_config", "...", "only unquantized weights load"
    )
    max_pos = positive_int(config, "max_position_embeddings", defaults.get("max_position_embeddings"))
    theta, scaling = rope_scaling(config, max_pos)
    max_seq_len = max_pos
    if scaling.type == RopeType.dynamic and scaling.factor:
        # Dynamic NTK exists to run past max_position_embeddings: allow factor x that context.
        max_seq_len = int(max_pos * scaling.factor)
    return {
        "name": f"hf-{config.get('model_type') or family}",
        "family": family,
        "dim": dim,
        "n_layers": n_layers,
        "n_heads": n_heads,
        "n_kv_heads": n_kv,
        "head_dim": head_dim if head_dim != dim // n_heads or dim % n_heads else None,
        "ffn_dim": positive_int(config, "intermediate_size"),
        "vocab_size": positive_int(config, "vocab_size"),
        "pad_vocab_to": 1,  # the checkpoint fixes the embedding rows; never pad them
        "max_seq_len": max_seq_len,
        "rope_theta": theta,
        "rope": scaling,
        "norm_eps": float(get("rms_norm_eps") or 1e-6),
        "tie_embeddings": bool(get("tie_word_embeddings") or False),
        "init_std": float(config.get("initializer_range", 0.02)),
    }


def activation(config: HFConfig, key: str, default: str, accepted: Mapping[str, str]) -> str:
    value = config.get(key) or default
    if value not in accepted:
        raise HFImportError(f"config.json: {key}={value!r} is not supported; accepted: {sorted(accepted)}")
    return accepted[value]


def common_keys(cfg: ModelConfig, family: Family) -> dict[str, Any]:
    """config.json keys every family writes (shape, norms, RoPE)."""
    return {
        "architectures": [family.architecture],
        "model_type": family.model_type,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_size,
        "max_position_embeddings": max_position(cfg),
        **rope_keys(cfg),
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": bool(cfg.tie_embeddings),
        "initializer_range": cfg.init_std,
    }


def build(kwargs: Mapping[str, Any]) -> ModelConfig:
    known = {f.name for f in fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in kwargs.items() if k in known})
