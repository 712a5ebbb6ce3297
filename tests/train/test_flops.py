"""FLOPs per token against a hand count, the peak table lookup, and MFU with an overridden peak."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from orchestra.config import ModelConfig
from orchestra.model import Transformer
from orchestra.train.flops import device_peak_flops, model_flops_per_token
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


FAMILY_SHAPES = {
    "head_dim_gqa_bias": dict(head_dim=24, n_kv_heads=1, qkv_bias=True, o_bias=True, mlp_bias=True),
    "qk_norm": dict(head_dim=8, qk_norm=True),
    "gemma": dict(
        head_dim=32, norm_offset=1.0, activation="gelu_tanh", scale_embeddings=True, tie_embeddings=True
    ),
}


@pytest.mark.parametrize("shape", list(FAMILY_SHAPES))
def test_family_matmul_terms_against_torch_flop_counter(shape: str) -> None:
    """Projections n_heads x head_dim wide; biases, norms and activations add no matmul FLOPs."""
    from torch.utils.flop_counter import FlopCounterMode

    base = dict(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=32, kernels="torch")
    cfg = ModelConfig.from_dict({**base, **FAMILY_SHAPES[shape]})
    model = Transformer(cfg, 320)
    tokens, targets = torch.randint(0, 320, (2, 32)), torch.randint(0, 320, (2, 32))
    with FlopCounterMode(display=False) as counter:
        model(tokens, targets).backward()
    attention = 12 * 3 * cfg.n_heads * cfg.head_size * 32  # SDPA's matmuls: not seen by the counter on CPU
    assert counter.get_total_flops() / 64 == model_flops_per_token(cfg, 320, 32) - attention


def test_softcapped_attention_is_counted_in_full_by_torch_flop_counter() -> None:
    """Gemma 2's soft-capped attention runs as explicit matmuls, which the counter sees: the whole formula."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = ModelConfig(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=24, ffn_dim=96, max_seq_len=32,
        attn_softcap=20.0, final_softcap=10.0, sandwich_norm=True, kernels="torch",
    )  # fmt: skip
    model = Transformer(cfg, 320)
    tokens, targets = torch.randint(0, 320, (2, 32)), torch.randint(0, 320, (2, 32))
    with FlopCounterMode(display=False) as counter:
        model(tokens, targets).backward()
    assert counter.get_total_flops() / 64 == model_flops_per_token(cfg, 320, 32)


def test_sliding_window_layers_count_the_keys_they_see() -> None:
    """A windowed layer attends to `window` keys instead of the sequence; every k-th layer stays full."""
    from dataclasses import replace

    full = ModelConfig(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=64)
    per_layer_key = 12 * 4 * 16  # 12 x n_heads x head_dim per key a query sees
    mistral = replace(full, sliding_window=8)
    assert (
        model_flops_per_token(full, 320, 64) - model_flops_per_token(mistral, 320, 64)
        == 4 * per_layer_key * 56
    )
    gemma2 = replace(full, sliding_window=8, global_every=2)  # layers 0 and 2 windowed
    assert (
        model_flops_per_token(full, 320, 64) - model_flops_per_token(gemma2, 320, 64)
        == 2 * per_layer_key * 56
    )
    assert model_flops_per_token(mistral, 320, 8) == model_flops_per_token(full, 320, 8)  # window covers it
    # The mask itself: a windowed query sees min(position + 1, window) keys; the convention counts the
    # window (as it counts seq_len, not the causal average, for a full layer).
    attn = Transformer(mistral, 320).layers[0].attention
    mask = attn._mask(64, 64, torch.device("cpu"), None)
    assert isinstance(mask, torch.Tensor) and int(mask.sum(-1).max()) == 8
