"""Conversion between our Transformer and Hugging Face ``LlamaForCausalLM``.

Only names change: the model was built so that every tensor has the same shape and layout as
in transformers (including the non-interleaved RoPE of q/k, so no permutation is needed). This
module does not import transformers; the exporter and the parity tests do.
"""

from __future__ import annotations

from typing import Any

import torch

from orchestra.config import ModelConfig

# Per-layer names: ours -> HF (under "layers.{i}." / "model.layers.{i}.").
_LAYER_NAMES: dict[str, str] = {
    "attention_norm.weight": "input_layernorm.weight",
    "attention.q_proj.weight": "self_attn.q_proj.weight",
    "attention.k_proj.weight": "self_attn.k_proj.weight",
    "attention.v_proj.weight": "self_attn.v_proj.weight",
    "attention.o_proj.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
}


def hf_config_dict(
    cfg: ModelConfig,
    vocab_size: int,
    bos_id: int | None = None,
    eos_id: int | None = None,
    torch_dtype: str = "float32",
) -> dict[str, Any]:
    """``LlamaConfig`` keyword arguments (and config.json content) describing this model.

    RoPE's theta is written twice on purpose: transformers 5 reads ``rope_parameters``
    ({"rope_type": "default", "rope_theta": ...}) and transformers 4 reads ``rope_theta``;
    5.x accepts both and gives rope_parameters precedence, so one file loads in either.
    bos/eos are always written (None when unknown) because LlamaConfig otherwise defaults
    them to 1 and 2, which are arbitrary tokens of our vocabulary.
    """
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len,
        "rope_theta": float(cfg.rope_theta),
        "rope_parameters": {"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": bool(cfg.tie_embeddings),
        "attention_bias": False,
        "mlp_bias": False,
        "hidden_act": "silu",
        "initializer_range": cfg.init_std,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "torch_dtype": torch_dtype,
    }


def _name_map(cfg: ModelConfig) -> dict[str, str]:
    """Our parameter name -> HF name, for every tensor HF stores (lm_head only when untied)."""
    names = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    for i in range(cfg.n_layers):
        for ours, theirs in _LAYER_NAMES.items():
            names[f"layers.{i}.{ours}"] = f"model.layers.{i}.{theirs}"
    if not cfg.tie_embeddings:
        names["lm_head.weight"] = "lm_head.weight"
    return names


def _expected_shapes(cfg: ModelConfig, vocab_size: int) -> dict[str, tuple[int, ...]]:
    """Our parameter name -> shape, for checking a state dict before anything is loaded."""
    D, F, hd = cfg.dim, cfg.ffn_dim, cfg.head_dim
    layer = {
        "attention_norm.weight": (D,),
        "attention.q_proj.weight": (cfg.n_heads * hd, D),
        "attention.k_proj.weight": (cfg.n_kv_heads * hd, D),
        "attention.v_proj.weight": (cfg.n_kv_heads * hd, D),
        "attention.o_proj.weight": (D, cfg.n_heads * hd),
        "mlp_norm.weight": (D,),
        "mlp.gate_proj.weight": (F, D),
        "mlp.up_proj.weight": (F, D),
        "mlp.down_proj.weight": (D, F),
    }
    shapes = {"tok_embeddings.weight": (vocab_size, D), "norm.weight": (D,)}
    for i in range(cfg.n_layers):
        for name, shape in layer.items():
            shapes[f"layers.{i}.{name}"] = shape
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (vocab_size, D)
    return shapes


def _vocab_size(sd: dict[str, torch.Tensor], key: str, what: str) -> int:
    if key not in sd:
        raise ValueError(f"{what} state dict is missing {key!r}")
    return int(sd[key].shape[0])


def _check(
    sd: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], what: str, ignore: set[str]
) -> None:
    """Raise ValueError naming the first missing, unexpected or mis-shaped tensor."""
    missing = sorted(set(expected) - set(sd))
    if missing:
        raise ValueError(f"{what} state dict is missing {len(missing)} tensor(s), e.g. {missing[:3]}")
    unexpected = sorted(k for k in set(sd) - set(expected) if k not in ignore)
    if unexpected:
        raise ValueError(f"{what} state dict has {len(unexpected)} unexpected tensor(s), e.g. {unexpected[:3]}")
    for name, shape in expected.items():
        if tuple(sd[name].shape) != shape:
            raise ValueError(f"{what} tensor {name!r} has shape {tuple(sd[name].shape)}, expected {shape}")


def to_hf_state_dict(state_dict: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our ``model.state_dict()`` -> HF ``LlamaForCausalLM`` names (same tensors, no copies).

    With tied embeddings lm_head.weight is left out, as transformers' own save does; the
    (identical) ``lm_head.weight`` entry of our state dict is accepted and dropped.
    """
    vocab = _vocab_size(state_dict, "tok_embeddings.weight", "Orchestra")
    ours = _expected_shapes(cfg, vocab)
    ignore = {"lm_head.weight"} if cfg.tie_embeddings else set()
    _check(state_dict, ours, "Orchestra", ignore)
    return {theirs: state_dict[name] for name, theirs in _name_map(cfg).items()}


def from_hf_state_dict(hf_sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF ``LlamaForCausalLM`` state dict -> ours, ready for ``model.load_state_dict(strict=True)``.

    Tolerated extras: rotary ``inv_freq`` buffers (old checkpoints saved them) and, when tied,
    an ``lm_head.weight`` equal to the embedding. With tied embeddings the result holds the
    embedding under both ``tok_embeddings.weight`` and ``lm_head.weight``, as our own
    state_dict() does.
    """
    names = _name_map(cfg)
    vocab = _vocab_size(hf_sd, "model.embed_tokens.weight", "Hugging Face")
    expected = {names[k]: shape for k, shape in _expected_shapes(cfg, vocab).items()}
    ignore = {k for k in hf_sd if k.endswith("rotary_emb.inv_freq")}
    if cfg.tie_embeddings and "lm_head.weight" in hf_sd:
        head, emb = hf_sd["lm_head.weight"], hf_sd["model.embed_tokens.weight"]
        if head.shape != emb.shape or not torch.equal(head, emb):
            raise ValueError(
                "Hugging Face tensor 'lm_head.weight' differs from 'model.embed_tokens.weight', "
                "but model.tie_embeddings=true; set tie_embeddings=false to load an untied head"
            )
        ignore.add("lm_head.weight")
    _check(hf_sd, expected, "Hugging Face", ignore)
    out = {ours: hf_sd[theirs] for ours, theirs in names.items()}
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out["tok_embeddings.weight"]
    return out
