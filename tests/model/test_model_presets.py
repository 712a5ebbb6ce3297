"""The presets of published shapes: they compose, validate, and have the published parameter counts.

Counted on the meta device (no memory), three ways that must agree with the literal count:
our model built from the composed preset; transformers' model built from the published
config.json values (written out below, independently of our families' writers); and
transformers' model built from the config.json our export writes for the preset. The
published config.json read back through our importer also gives the preset's shape.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

from orchestra.config import validate
from orchestra.model.hf import hf_config_dict, model_config_from_hf
from orchestra.model.transformer import Transformer
from tests.test_config import composed

transformers = pytest.importorskip("transformers")

# Published parameter counts (the models' safetensors totals; a tied matrix counted once), each
# confirmed by the meta-device build of transformers' model from the published config below.
PUBLISHED_COUNT = {
    "llama-3.2-1b": 1_235_814_400,
    "llama-3.1-8b": 8_030_261_248,
    "qwen2.5-0.5b": 494_032_768,
    "qwen2.5-7b": 7_615_616_512,
    "qwen3-0.6b": 596_049_920,
    "qwen3-8b": 8_190_735_360,
    "mistral-7b": 7_241_732_096,
    "gemma-2-2b": 2_614_341_888,
    "phi-3-mini": 3_821_079_552,
}

_LLAMA3 = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu", attention_bias=False,
    mlp_bias=False, num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5,
    rope_theta=500000.0, max_position_embeddings=131072, vocab_size=128256,
)  # fmt: skip
_QWEN = dict(hidden_act="silu", rms_norm_eps=1e-6, rope_theta=1000000.0, use_sliding_window=False)

# The shape keys of each model's published config.json (meta-llama/Llama-3.2-1B,
# meta-llama/Llama-3.1-8B, Qwen/Qwen2.5-0.5B, Qwen/Qwen2.5-7B, Qwen/Qwen3-0.6B, Qwen/Qwen3-8B,
# mistralai/Mistral-7B-v0.1, google/gemma-2-2b, microsoft/Phi-3-mini-4k-instruct).
PUBLISHED_CONFIG: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-3.2-1b": (
        "LlamaConfig",
        {
            **_LLAMA3, "hidden_size": 2048, "num_hidden_layers": 16, "head_dim": 64, "intermediate_size": 8192,
            "tie_word_embeddings": True,
            "rope_scaling": {
                "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
        },
    ),
    "llama-3.1-8b": (
        "LlamaConfig",
        {
            **_LLAMA3, "hidden_size": 4096, "num_hidden_layers": 32, "intermediate_size": 14336,
            "tie_word_embeddings": False,
            "rope_scaling": {
                "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
        },
    ),
    "qwen2.5-0.5b": (
        "Qwen2Config",
        {
            **_QWEN, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896,
            "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
            "intermediate_size": 4864, "vocab_size": 151936, "max_position_embeddings": 32768,
            "sliding_window": 32768, "max_window_layers": 24, "tie_word_embeddings": True,
        },
    ),
    "qwen2.5-7b": (
        "Qwen2Config",
        {
            **_QWEN, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584,
            "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
            "intermediate_size": 18944, "vocab_size": 152064, "max_position_embeddings": 131072,
            "sliding_window": 131072, "max_window_layers": 28, "tie_word_embeddings": False,
        },
    ),
    "qwen3-0.6b": (
        "Qwen3Config",
        {
            **_QWEN, "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 1024,
            "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
            "intermediate_size": 3072, "vocab_size": 151936, "max_position_embeddings": 40960,
            "attention_bias": False, "sliding_window": None, "max_window_layers": 28,
            "tie_word_embeddings": True,
        },
    ),
    "qwen3-8b": (
        "Qwen3Config",
        {
            **_QWEN, "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 4096,
            "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
            "intermediate_size": 12288, "vocab_size": 151936, "max_position_embeddings": 40960,
            "attention_bias": False, "sliding_window": None, "max_window_layers": 36,
            "tie_word_embeddings": False,
        },
    ),
    "mistral-7b": (
        "MistralConfig",
        {
            "architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_act": "silu",
            "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
            "intermediate_size": 14336, "vocab_size": 32000, "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "sliding_window": 4096, "tie_word_embeddings": False,
        },
    ),
    "gemma-2-2b": (
        "Gemma2Config",
        {
            "architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "hidden_act": "gelu_pytorch_tanh",
            "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 2304, "num_hidden_layers": 26,
            "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "intermediate_size": 9216,
            "vocab_size": 256000, "max_position_embeddings": 8192, "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0, "query_pre_attn_scalar": 256, "attn_logit_softcapping": 50.0,
            "final_logit_softcapping": 30.0, "sliding_window": 4096, "attention_bias": False,
            "tie_word_embeddings": True,
        },
    ),
    "phi-3-mini": (
        "Phi3Config",
        {
            "architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "hidden_act": "silu",
            "hidden_size": 3072, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
            "intermediate_size": 8192, "vocab_size": 32064, "max_position_embeddings": 4096,
            "original_max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "rope_scaling": None, "sliding_window": 2047, "attention_bias": False,
            "tie_word_embeddings": False, "pad_token_id": 32000,
        },
    ),
}  # fmt: skip

ARCHITECTURE = {preset: config["architectures"][0] for preset, (_, config) in PUBLISHED_CONFIG.items()}


def _meta_count(hf_config: Any) -> tuple[str, int]:
    """transformers' causal LM for ``hf_config`` on the meta device: class name, parameter count."""
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_config)
    # parameters() yields a tied matrix once, as the safetensors totals count it.
    return type(model).__name__, sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("preset", list(PUBLISHED_COUNT))
def test_preset_composes_and_validates(preset: str) -> None:
    cfg = composed(f"model={preset}")
    assert cfg.model.name == preset
    validate(cfg)
    assert cfg.model.vocab_size is not None  # fixed by the model, not by a tokenizer


@pytest.mark.parametrize("preset", list(PUBLISHED_COUNT))
def test_preset_has_the_published_parameter_count(preset: str) -> None:
    cfg = composed(f"model={preset}").model
    assert cfg.vocab_size is not None
    with torch.device("meta"):
        ours = Transformer(cfg, cfg.vocab_size)
    assert ours.num_parameters() == PUBLISHED_COUNT[preset]


@pytest.mark.parametrize("preset", list(PUBLISHED_COUNT))
def test_published_config_gives_the_published_count_and_the_preset(preset: str) -> None:
    """transformers' model of the published config.json has the literal count, and our importer
    reads that config.json as the preset (up to the name and the training context length)."""
    class_name, published = PUBLISHED_CONFIG[preset]
    hf_config = getattr(transformers, class_name)(**published)
    assert _meta_count(hf_config) == (ARCHITECTURE[preset], PUBLISHED_COUNT[preset])

    imported, vocab = model_config_from_hf(published)
    cfg = composed(f"model={preset}").model
    assert vocab == cfg.vocab_size
    assert imported.max_seq_len == published["max_position_embeddings"] >= cfg.max_seq_len
    # The importer sets vocab_size, so its pad_vocab_to (1) rounds nothing, as the preset's does not;
    # it writes head_dim only where it is not dim // n_heads (Qwen3-8B's preset states it anyway).
    same = dict(name=cfg.name, max_seq_len=cfg.max_seq_len, pad_vocab_to=cfg.pad_vocab_to)
    assert dataclasses.replace(imported, head_dim=imported.head_size, **same) == dataclasses.replace(
        cfg, head_dim=cfg.head_size
    )


@pytest.mark.parametrize("preset", list(PUBLISHED_COUNT))
def test_exported_config_builds_the_same_model_in_transformers(preset: str) -> None:
    cfg = composed(f"model={preset}").model
    assert cfg.vocab_size is not None
    config = hf_config_dict(cfg, cfg.vocab_size)
    assert config["architectures"] == [ARCHITECTURE[preset]]
    hf_config = transformers.AutoConfig.for_model(**{k: v for k, v in config.items() if k != "architectures"})
    assert _meta_count(hf_config) == (ARCHITECTURE[preset], PUBLISHED_COUNT[preset])
