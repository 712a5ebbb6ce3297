"""FLOPs per token against a hand count and torch's FlopCounterMode (projections exactly; attention by
the (query, key) pairs the model's own masks leave visible), the peak table lookup, and MFU with an
overridden peak."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from orchestra.config import ModelConfig
from orchestra.model import Transformer
from orchestra.train.flops import (
    attention_flops_per_token,
    attention_keys,
    device_peak_flops,
    model_flops_per_token,
    visible_pairs,
)
from tests.helpers import tiny_config


def test_llama_8b_flops_per_token_by_hand() -> None:
    m = ModelConfig(
        dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336, vocab_size=128256, max_seq_len=8192
    )
    # Per layer: q 4096x4096, k and v 4096x1024 each, o 4096x4096, gate/up/down 3 x 4096x14336.
    per_layer = 4096 * 4096 + 2 * 4096 * 1024 + 4096 * 4096 + 3 * 4096 * 14336  # 218,103,808
    n_matmul = 32 * per_layer + 128256 * 4096  # + lm head = 7,504,658,432 (Llama-3-8B: 8.03B with embeddings)
    assert n_matmul == 7_504_658_432
    assert model_flops_per_token(m, 128256, 8192) == 6 * n_matmul + 12 * 32 * 4096 * 8192


@pytest.mark.parametrize("tied", [False, True])
def test_formula_counts_exactly_the_model_matmul_weights(tied: bool) -> None:
    cfg = ModelConfig(
        dim=64, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=160, max_seq_len=32, tie_embeddings=tied
    )
    model = Transformer(cfg, 320)
    norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    embedding = 320 * 64
    # A tied matrix is one tensor, but it is used twice: once as a lookup, once in the lm-head matmul.
    n_matmul = model.num_parameters() - norms - embedding + (embedding if tied else 0)
    assert model_flops_per_token(cfg, 320, 32) == 6 * n_matmul + 12 * 3 * 64 * 32


def test_peak_table_lookup() -> None:
    assert device_peak_flops("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert device_peak_flops("NVIDIA H100 PCIe", "bf16") == 756e12
    assert device_peak_flops("NVIDIA A100-SXM4-80GB", "bf16") == 312e12
    assert device_peak_flops("AMD Instinct MI300X", "bf16") == 1307e12
    assert device_peak_flops("Some Future Accelerator", "bf16") is None
    assert device_peak_flops("Tesla V100-SXM2-32GB", "bf16") is None  # no bf16 on Volta


@pytest.mark.slow
def test_mfu_with_an_overridden_peak(corpus_dir: Path, data_cache: Path, tmp_path: Path) -> None:
    from orchestra.train.run import train

    cfg = tiny_config(corpus_dir, data_cache, tmp_path / "run", max_steps=10, peak_flops=1e12)
    summary = train(cfg).summary
    assert summary == json.loads((tmp_path / "run" / "summary.json").read_text())
    fpt = model_flops_per_token(cfg.model, 512, 64)
    assert summary["mfu"] == pytest.approx(summary["tokens_per_s"] * fpt / 1e12, rel=1e-6)
    assert 0 < summary["mfu"] < 1


def test_frozen_base_and_classifier_terms_against_torch_flop_counter() -> None:
    """torch's FlopCounterMode on forward + backward: 6N with weight gradients, about 4N without."""
    from torch.utils.flop_counter import FlopCounterMode

    from orchestra.config import KernelBackend
    from orchestra.model.peft import LoraConfig, apply_lora

    cfg = ModelConfig(
        dim=64, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=160, max_seq_len=32, kernels=KernelBackend.torch
    )
    attention = 12 * 3 * 64 * 32  # SDPA's matmuls: not seen by the counter on CPU
    measured = {}
    for lora in (False, True):
        model = Transformer(cfg, 320)
        if lora:
            apply_lora(model, LoraConfig(rank=2, target_modules=["q_proj"]))
        tokens, targets = torch.randint(0, 320, (2, 32)), torch.randint(0, 320, (2, 32))
        with FlopCounterMode(display=False) as counter:
            model(tokens, targets).backward()
        measured[lora] = counter.get_total_flops() / 64
    assert measured[False] == model_flops_per_token(cfg, 320, 32) - attention
    frozen = model_flops_per_token(cfg, 320, 32, weight_grads=False) - attention
    assert measured[True] == pytest.approx(frozen, rel=0.05)  # block 0 needs no input gradient
    head = 320 * 64
    assert (
        model_flops_per_token(cfg, 320, 32, lm_head=False) == model_flops_per_token(cfg, 320, 32) - 6 * head
    )


SEQ = 32
VARIANTS = {
    "llama_mha": dict(n_kv_heads=4),
    "gqa": dict(n_kv_heads=1),
    "head_dim_wider_bias": dict(head_dim=24, n_kv_heads=1, qkv_bias=True, o_bias=True, mlp_bias=True),
    "head_dim_narrower_qk_norm": dict(head_dim=8, qk_norm=True),
    "gemma": dict(
        head_dim=32, norm_offset=1.0, activation="gelu_tanh", scale_embeddings=True, tie_embeddings=True
    ),
    "mistral_window": dict(sliding_window=8, head_dim=24),  # every layer windowed: explicit bool masks
    "window_one_short": dict(sliding_window=SEQ - 1),  # masks one pair per layer
    "window_covers_sequence": dict(sliding_window=SEQ),  # the window changes nothing: is_causal
    "gemma2": dict(
        head_dim=24,
        sliding_window=8,
        global_every=2,
        attn_softcap=20.0,
        final_softcap=10.0,
        sandwich_norm=True,
        norm_offset=1.0,
        activation="gelu_tanh",
        tie_embeddings=True,
    ),
}


def _variant(name: str) -> ModelConfig:
    base = dict(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=SEQ, kernels="torch")
    return ModelConfig.from_dict({**base, **VARIANTS[name]})


def _mask_pairs(model: Transformer, layer: int) -> int:
    """Unmasked (query, key) pairs of one layer, counted from the model's own attention mask."""
    mask = model.layers[layer].attention._mask(SEQ, SEQ, torch.device("cpu"), None)
    if isinstance(mask, str):  # "causal": SDPA's is_causal, the lower triangle
        assert mask == "causal"
        return int(torch.ones(SEQ, SEQ, dtype=torch.bool).tril().sum())
    assert isinstance(mask, torch.Tensor) and mask.shape == (SEQ, SEQ)
    return int(mask.sum())


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_family_terms_against_torch_flop_counter(variant: str) -> None:
    """Forward + backward under FlopCounterMode, with SDPA on its math backend so that the counter
    sees attention's matmuls as bmm (its fused CPU kernel is invisible to it).

    Projections (mm/addmm) must equal 6 x the formula's matmul parameters exactly: q/o n_heads x
    head_dim wide; biases, norms and activations add no matmul FLOPs. Attention (bmm) is counted for
    the whole T x S score matrix, masked or not; the formula scales each layer's share of it by the
    pairs its mask leaves visible over those of a full causal layer, counted from the model's mask.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    cfg = _variant(variant)
    model = Transformer(cfg, 320)
    tokens, targets = torch.randint(0, 320, (2, SEQ)), torch.randint(0, 320, (2, SEQ))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(tokens, targets).backward()
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    assert set(counts) <= {"aten.mm", "aten.addmm", "aten.bmm"}, counts
    n_tokens = tokens.numel()

    projections = (counts.get("aten.mm", 0) + counts.get("aten.addmm", 0)) / n_tokens
    attention = attention_flops_per_token(cfg, SEQ)
    # Both sides are whole numbers; the tolerance only absorbs the float subtraction of a fractional term.
    assert projections == pytest.approx(model_flops_per_token(cfg, 320, SEQ) - attention, abs=1e-6)

    q_dim = cfg.n_heads * cfg.head_size
    full_matrix = counts["aten.bmm"] / n_tokens
    assert full_matrix == 12 * q_dim * SEQ * cfg.n_layers  # every layer: T x S scores, masked or not
    causal = visible_pairs(SEQ)
    assert causal == SEQ * (SEQ + 1) // 2
    pairs = [_mask_pairs(model, i) for i in range(cfg.n_layers)]
    window = cfg.sliding_window
    assert pairs == [visible_pairs(SEQ, window if cfg.is_windowed(i) else None) for i in range(cfg.n_layers)]
    assert attention == pytest.approx(sum(full_matrix / cfg.n_layers * p / causal for p in pairs), rel=1e-12)


def test_full_attention_term_is_the_whole_score_matrix() -> None:
    """The convention for full causal layers, unchanged: 12 x n_heads x head_dim x seq_len per layer."""
    cfg = ModelConfig(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=24, ffn_dim=96, max_seq_len=64)
    assert attention_flops_per_token(cfg, 64) == 12 * 3 * 4 * 24 * 64
    assert attention_flops_per_token(replace(cfg, sliding_window=64), 64) == 12 * 3 * 4 * 24 * 64
    assert attention_flops_per_token(replace(cfg, sliding_window=1000), 64) == 12 * 3 * 4 * 24 * 64


def test_visible_pairs_and_keys_of_a_causal_window() -> None:
    """Query i sees min(i + 1, w) keys: the closed forms against a brute-force count."""
    for seq in (1, 2, 7, 32, 33):
        for window in (None, 1, 2, 5, 31, 32, 40):
            brute = sum(min(i + 1, window or seq) for i in range(seq))
            assert visible_pairs(seq, window) == brute
            assert attention_keys(seq, window) == pytest.approx(
                seq * brute / (seq * (seq + 1) / 2), rel=1e-15
            )
    # w(2T - w + 1)/(T + 1): about 2w when T >> w, T once the window covers the sequence, continuous.
    assert attention_keys(64, 8) == 8 * (128 - 8 + 1) / 65
    assert attention_keys(64, 64) == attention_keys(64, None) == 64
    assert attention_keys(2048, 2047) == pytest.approx(2048, rel=1e-6)  # Phi-3-mini's window at T = 2048
    # Mistral-7B at 8192 with its 4096 window scores 75% of a full layer's pairs.
    assert attention_keys(8192, 4096) / 8192 == pytest.approx(0.75, abs=1e-4)


def test_sliding_window_layers_count_their_share_of_the_pairs() -> None:
    """A windowed layer counts attention_keys(T, w) keys instead of T; every k-th layer stays full."""
    full = ModelConfig(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=64)
    per_key = 12 * 4 * 16  # 12 x n_heads x head_dim per counted key
    saved = per_key * (64 - attention_keys(64, 8))
    mistral = replace(full, sliding_window=8)
    assert model_flops_per_token(full, 320, 64) - model_flops_per_token(mistral, 320, 64) == pytest.approx(
        4 * saved
    )
    gemma2 = replace(full, sliding_window=8, global_every=2)  # layers 0 and 2 windowed
    assert model_flops_per_token(full, 320, 64) - model_flops_per_token(gemma2, 320, 64) == pytest.approx(
        2 * saved
    )
    assert model_flops_per_token(mistral, 320, 8) == model_flops_per_token(full, 320, 8)  # window covers it
    # Frozen base: attention's term does not change (backward still needs dQ, dK, dV).
    assert model_flops_per_token(mistral, 320, 64) - model_flops_per_token(
        mistral, 320, 64, weight_grads=False
    ) == model_flops_per_token(full, 320, 64) - model_flops_per_token(full, 320, 64, weight_grads=False)
