"""QLoRA's NF4 base (orchestra/model/peft/nf4.py): the paper's codebook, torchao's linear, merge and export shape.

The reference for the 4-bit format is the QLoRA paper itself (Dettmers et al. 2023, appendix E):
its sixteen NormalFloat values, and blocks of 64 weights scaled by their absolute maximum.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from orchestra.config import ConfigError, FinetuneConfig, FinetuneMethod
from orchestra.model import ModelConfig, build_model
from orchestra.model.peft import LoRALinear, merge_lora
from orchestra.model.peft.nf4 import NF4Linear, dequantize_linears, quantize_linears, scaler_block_size
from orchestra.train.finetune import apply_method

# The NF4 data type of the QLoRA paper (appendix E; bitsandbytes' nf4 table), to four decimals.
NF4_VALUES = torch.tensor(
    [-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0,
     0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0]
)  # fmt: skip


def test_dequantized_blocks_are_the_papers_codebook_times_their_absmax() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(256, 128, bias=False)
    q = NF4Linear.from_linear(linear)
    w = q.dequantized().float().reshape(-1, 64)
    absmax = w.abs().amax(dim=1, keepdim=True)
    normalised = w / absmax
    nearest = (normalised.unsqueeze(-1) - NF4_VALUES).abs().min(-1).values
    assert nearest.max() < 2e-4  # every weight is a codebook value times its block's scale
    original = linear.weight.detach().reshape(-1, 64)
    # The block scale is the block's absmax, kept to ~1% by the 8-bit double quantization.
    torch.testing.assert_close(absmax, original.abs().amax(1, keepdim=True), rtol=2e-2, atol=1e-3)
    # Each weight rounds to the nearest code: the error is at most half the widest gap x absmax.
    half_gap = float(NF4_VALUES.diff().max()) / 2
    assert ((w - original).abs() <= half_gap * absmax * 1.02 + 1e-6).all()


def test_nf4_linear_is_torchaos_dequantized_matmul_at_a_seventh_of_the_memory() -> None:
    torch.manual_seed(1)
    linear = nn.Linear(128, 192, bias=True)
    q = NF4Linear.from_linear(linear)
    x = torch.randn(3, 7, 128)
    expected = torch.nn.functional.linear(x, q.dequantized(), linear.bias)
    torch.testing.assert_close(q(x), expected, rtol=1e-5, atol=1e-5)
    assert not q.weight.requires_grad and isinstance(q, nn.Linear)
    inner = q.weight.__tensor_flatten__()[0]  # type: ignore[attr-defined]
    stored = sum(getattr(q.weight, name).untyped_storage().nbytes() for name in inner)
    assert stored < 0.6 * linear.weight.numel()  # ~0.53 bytes per weight (4 bits + scales) vs 4 in fp32


def test_scaler_blocks_fit_small_layers() -> None:
    assert scaler_block_size(4096 * 4096) == 256  # QLoRA's own
    assert scaler_block_size(64 * 64) == 64  # 64 absmax values
    assert scaler_block_size(64 * 96) == 32
    with pytest.raises(ValueError, match="blocks of 64 weights"):
        NF4Linear.from_linear(nn.Linear(10, 10))


def tiny(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = ModelConfig(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=32, vocab_size=128
    )
    return build_model(cfg, 128)


def test_qlora_quantizes_the_blocks_trains_lora_only_and_merges_to_what_it_computes() -> None:
    model = apply_method(
        tiny(), FinetuneConfig(method=FinetuneMethod.qlora, lora_targets=["q_proj", "v_proj"])
    )
    quantized = [n for n, m in model.named_modules() if isinstance(m, NF4Linear)]
    assert len(quantized) == 2 * 7 and not any("lm_head" in n for n in quantized)
    assert isinstance(model.get_submodule("layers.0.attention.q_proj"), LoRALinear)
    assert isinstance(model.get_submodule("layers.0.attention.k_proj"), NF4Linear)  # not a target: NF4 alone
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    x, y = torch.randint(0, 128, (2, 16)), torch.randint(0, 128, (2, 16))
    model(x, y).backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n in trainable)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.normal_(std=0.2)
        before = model(x)
    assert dequantize_linears(model) == quantized
    merge_lora(model)
    assert not any(isinstance(m, (NF4Linear, LoRALinear)) for m in model.modules())
    assert set(model.state_dict()) == set(tiny().state_dict())  # the plain model's names again: exportable
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-4, atol=1e-5)


def test_quantize_keeps_task_heads_and_names_a_layer_it_cannot_quantize() -> None:
    from orchestra.model.heads import SequenceClassifier

    classifier = SequenceClassifier(tiny(), 1)
    quantize_linears(classifier)
    assert type(classifier.score) is nn.Linear  # the new head trains in full precision
    odd = nn.Sequential(nn.Linear(64, 64), nn.Linear(10, 3))
    with pytest.raises(ValueError, match=r"^1: NF4 quantizes blocks of 64"):
        quantize_linears(odd)
    with pytest.raises(ConfigError, match="qlora cannot quantize"):
        apply_method(odd, FinetuneConfig(method=FinetuneMethod.qlora, lora_targets=["all-linear"]))
