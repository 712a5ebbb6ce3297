"""Every supported family against transformers: tiny random models built by transformers' own
config classes, loaded into ours; logits, cached greedy generation and export back compared.

Shapes cover MHA, GQA and MQA, tied and untied heads, explicit head_dim, every RoPE scaling,
sliding windows shorter than the sequence, and Gemma's norm/activation/soft-cap variants.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from orchestra.model import generate
from orchestra.model.config import KernelBackend, RopeType
from orchestra.model.hf import hf_config_dict, load_hf_pretrained, to_hf_state_dict

transformers = pytest.importorskip("transformers")

VOCAB = 97
SEQ = 40
BASE: dict[str, Any] = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    initializer_range=0.1,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "gemma": ("GemmaConfig", "GemmaForCausalLM"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM"),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
}
HALF = 8  # head_dim 16 / 2: the number of LongRoPE factors
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama2_mha": ("llama", dict(num_key_value_heads=4)),
    "llama3_gqa_tied": (
        "llama",
        dict(tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
    ),
    "llama_mqa_head_dim": ("llama", dict(num_key_value_heads=1, head_dim=24)),
    "llama_bias": ("llama", dict(attention_bias=True, mlp_bias=True)),
    "llama31_rope_llama3": (
        "llama",
        dict(
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            }
        ),
    ),
    "llama_rope_linear": (
        "llama",
        dict(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
    ),
    "llama_rope_dynamic": (
        "llama",
        dict(
            max_position_embeddings=16,
            rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0},
        ),
    ),
    "llama_rope_yarn": (
        "llama",
        dict(
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 16,
            }
        ),
    ),
    "mistral_window": ("mistral", dict(sliding_window=7)),
    "mistral_nemo_head_dim_window": ("mistral", dict(head_dim=24, sliding_window=9, num_key_value_heads=1)),
    "qwen2_bias": ("qwen2", dict()),
    "qwen2_tied_yarn": (
        "qwen2",
        dict(
            tie_word_embeddings=True,
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 1000000.0,
                "factor": 2.0,
                "original_max_position_embeddings": 32,
            },
        ),
    ),
    "qwen3_qk_norm": ("qwen3", dict(head_dim=24)),
    "qwen3_tied_mqa": ("qwen3", dict(head_dim=16, num_key_value_heads=1, tie_word_embeddings=True)),
    "gemma": ("gemma", dict(head_dim=16)),
    "gemma_mqa": ("gemma", dict(head_dim=24, num_key_value_heads=1)),
    "gemma2": (
        "gemma2",
        dict(
            head_dim=16,
            sliding_window=6,
            query_pre_attn_scalar=20,
            attn_logit_softcapping=3.0,
            final_logit_softcapping=2.0,
        ),
    ),
    "gemma2_four_layers": (
        "gemma2",
        dict(
            num_hidden_layers=4,
            head_dim=24,
            sliding_window=5,
            query_pre_attn_scalar=24,
            num_key_value_heads=4,
        ),
    ),
    "gemma3_text": (
        "gemma3",
        dict(
            num_hidden_layers=4,
            head_dim=16,
            sliding_window=6,
            query_pre_attn_scalar=16,
            layer_types=["sliding_attention", "full_attention"] * 2,
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            },
        ),
    ),
    "gemma3_pattern_tied": (
        "gemma3",
        dict(num_hidden_layers=3, head_dim=24, sliding_window=5, sliding_window_pattern=3),
    ),
    "phi3_fused": ("phi3", dict()),
    "phi3_longrope_window": (
        "phi3",
        dict(
            original_max_position_embeddings=16,
            sliding_window=11,
            rope_parameters={
                "rope_type": "longrope",
                "rope_theta": 10000.0,
                "short_factor": [1.0 + 0.1 * i for i in range(HALF)],
                "long_factor": [1.0 + 0.7 * i for i in range(HALF)],
            },
        ),
    ),
}


def _hf_model(family: str, opts: dict[str, Any], seed: int = 0) -> Any:
    config_name, model_name = CLASSES[family]
    config = getattr(transformers, config_name)(**{**BASE, **opts})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).float().eval()
    with torch.no_grad():  # random norms too, so (1 + w) and w gains are both exercised
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _seq_len(ours: Any) -> int:
    return min(SEQ, ours.cfg.max_seq_len)


@pytest.fixture(params=list(CASES))
def pair(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, Any, Any, Path]:
    family, opts = CASES[request.param]
    hf = _hf_model(family, opts)
    hf.save_pretrained(str(tmp_path / "hf"))
    ours, _ = load_hf_pretrained(tmp_path / "hf", kernels=KernelBackend.torch)
    return request.param, hf, ours, tmp_path


def test_logits_match_transformers(pair: tuple[str, Any, Any, Path]) -> None:
    case, hf, ours, _ = pair
    assert ours.cfg.family == CASES[case][0]
    torch.manual_seed(1)
    tokens = torch.randint(0, VOCAB, (2, _seq_len(ours)))
    with torch.no_grad():
        expected = hf(tokens).logits.float()
        got = ours(tokens)
    assert (got - expected).abs().max().item() <= 1e-5
    # The loss the model trains on is the cross-entropy of these same (capped) logits.
    targets = torch.randint(0, VOCAB, tokens.shape)
    with torch.no_grad():
        loss = ours(tokens, targets)
    ref = torch.nn.functional.cross_entropy(expected.reshape(-1, VOCAB), targets.reshape(-1))
    assert abs(loss.item() - ref.item()) <= 1e-5


def test_cached_greedy_generation_matches_transformers(pair: tuple[str, Any, Any, Path]) -> None:
    _case, _, ours, tmp_path = pair
    # A fresh transformers model: dynamic RoPE keeps state from earlier calls.
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "hf"), attn_implementation="eager"
    ).eval()
    torch.manual_seed(2)
    n_new = min(24, ours.cfg.max_seq_len - 12)
    prompt = torch.randint(0, VOCAB, (1, 12))  # generation runs past every window above
    with torch.no_grad():
        expected = hf.generate(
            prompt,
            max_new_tokens=n_new,
            min_new_tokens=n_new,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    got = generate(ours, prompt, n_new, temperature=0.0)
    assert got.tolist() == expected.tolist()


def test_export_is_the_same_architecture_with_equal_logits(pair: tuple[str, Any, Any, Path]) -> None:
    _case, hf, ours, tmp_path = pair
    from safetensors.torch import save_file

    out = tmp_path / "export"
    out.mkdir()
    state = {k: v.contiguous() for k, v in to_hf_state_dict(ours.state_dict(), ours.cfg).items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = hf_config_dict(ours.cfg, ours.vocab_size)
    (out / "config.json").write_text(json.dumps(config))
    back = transformers.AutoModelForCausalLM.from_pretrained(str(out), attn_implementation="eager").eval()
    assert type(back).__name__ == type(hf).__name__
    assert set(back.state_dict()) == set(hf.state_dict())
    torch.manual_seed(3)
    tokens = torch.randint(0, VOCAB, (2, _seq_len(ours)))
    with torch.no_grad():
        assert (back(tokens).logits - hf(tokens).logits).abs().max().item() <= 1e-5
    # And it imports back to the same config.
    again, _ = load_hf_pretrained(out, kernels=KernelBackend.torch)
    assert again.cfg == ours.cfg


def test_variants_are_read_into_config_fields() -> None:
    cfg = load_cfg("gemma2")
    assert (cfg.norm_offset, cfg.scale_embeddings, cfg.sandwich_norm) == (1.0, True, True)
    assert cfg.attn_softcap == 3.0 and cfg.final_softcap == 2.0 and cfg.attn_scale == pytest.approx(20**-0.5)
    assert cfg.sliding_window == 6 and cfg.global_every == 2
    assert [cfg.is_windowed(i) for i in range(3)] == [True, False, True]
    cfg = load_cfg("phi3_longrope_window")
    assert cfg.rope.type == RopeType.longrope and cfg.rope.original_max_seq_len == 16
    assert cfg.sliding_window == 11 and cfg.global_every == 0
    assert load_cfg("qwen2_bias").qkv_bias and not load_cfg("qwen2_bias").o_bias
    assert load_cfg("qwen3_qk_norm").qk_norm and load_cfg("qwen3_qk_norm").head_size == 24


def load_cfg(case: str) -> Any:
    from orchestra.model.hf import model_config_from_hf

    family, opts = CASES[case]
    config = getattr(transformers, CLASSES[family][0])(**{**BASE, **opts})
    return model_config_from_hf(config.to_dict())[0]
