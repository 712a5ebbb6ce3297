"""model.attention: SDPA with grouped heads in place, FlexAttention block masks and the repeat_kv
reference all give transformers' logits and the same gradients, on plain and packed rows."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch

from orchestra.model.config import AttentionImpl, KernelBackend, SdpaBackend
from orchestra.model.flex import BlockMasks
from orchestra.model.hf import load_hf_pretrained
from orchestra.model.transformer import Transformer, sdpa_priority
from tests.model.test_model_families import CASES, VOCAB, _hf_model

# GQA and MQA, windows (all layers, alternate layers, Gemma 3's pattern), soft-capped scores, q/k norms.
ATTENTION_CASES = [
    "llama3_gqa_tied",
    "mistral_nemo_head_dim_window",
    "gemma2",
    "gemma3_text",
    "qwen3_qk_norm",
]
IMPLS = [AttentionImpl.sdpa, AttentionImpl.flex, AttentionImpl.repeat_kv, AttentionImpl.auto]


@pytest.fixture(autouse=True)
def flex_backward_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lift torch's refusal of FlexAttention's backward off CUDA, so its dense reference backward
    (the numbers its fused CUDA kernel is tested against) checks our masks' gradients here."""
    import torch.nn.attention.flex_attention as fa

    monkeypatch.setattr(fa, "_validate_device", lambda *args: None)


def _with_attention(model: Transformer, impl: AttentionImpl) -> Transformer:
    twin = Transformer(dataclasses.replace(model.cfg, attention=impl), model.vocab_size)
    twin.load_state_dict(model.state_dict())
    return twin.eval()


@pytest.fixture(scope="module", params=ATTENTION_CASES)
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Transformer]:
    family, opts = CASES[request.param]
    hf = _hf_model(family, opts)
    path = tmp_path_factory.mktemp(request.param) / "hf"
    hf.save_pretrained(str(path))
    ours, _ = load_hf_pretrained(Path(path), kernels=KernelBackend.torch)
    return hf, ours


@pytest.mark.parametrize("impl", IMPLS, ids=lambda impl: impl.value)
def test_logits_and_gradients_match_transformers(case: tuple[Any, Transformer], impl: AttentionImpl) -> None:
    hf, ours = case
    model = _with_attention(ours, impl)
    tokens = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(3))
    targets = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = hf(tokens).logits.float()
        assert (model(tokens) - expected).abs().max().item() <= 1e-5
    reference = _with_attention(ours, AttentionImpl.repeat_kv)
    model(tokens, targets).backward()
    reference(tokens, targets).backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert p.grad is not None and q.grad is not None
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("impl", IMPLS, ids=lambda impl: impl.value)
def test_packed_rows_equal_each_document_alone_in_transformers(
    case: tuple[Any, Transformer], impl: AttentionImpl
) -> None:
    """A packed row's documents see only themselves: each equals transformers on that document alone."""
    hf, ours = case
    model = _with_attention(ours, impl)
    lengths = [[9, 1, 14], [24]]  # a one-token document, a document longer than the windows
    gen = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, VOCAB, (2, 24), generator=gen)
    segment_ids = torch.tensor([[i for i, n in enumerate(row) for _ in range(n)] for row in lengths])
    with torch.no_grad():
        packed = model.logits(model.hidden_states(tokens, segment_ids=segment_ids))
        for b, row in enumerate(lengths):
            start = 0
            for n in row:
                alone = hf(tokens[b : b + 1, start : start + n]).logits.float()[0]
                assert (packed[b, start : start + n] - alone).abs().max().item() <= 2e-5
                start += n


def test_masks_follow_the_setting_and_the_device() -> None:
    """flex builds block masks on any device; auto and sdpa on CPU keep the dense mask (or none)."""
    from tests.model.conftest import tiny_config

    seg = torch.tensor([[0] * 10 + [1] * 14])
    for impl, packed, plain in [
        (AttentionImpl.flex, BlockMasks, BlockMasks),
        (AttentionImpl.auto, torch.Tensor, type(None)),
        (AttentionImpl.sdpa, torch.Tensor, type(None)),
        (AttentionImpl.repeat_kv, torch.Tensor, type(None)),
    ]:
        model = Transformer(tiny_config(attention=impl, sliding_window=7), 64)
        assert isinstance(model.attention_masks(seg, 1, 24, seg.device), packed)
        assert isinstance(model.attention_masks(None, 1, 24, seg.device), plain)
    flex_masks = Transformer(tiny_config(attention=AttentionImpl.flex, sliding_window=7), 64).attention_masks(
        None, 1, 24, seg.device
    )
    assert isinstance(flex_masks, BlockMasks) and flex_masks.windowed is not None
    assert flex_masks.of(None) is flex_masks.full and flex_masks.of(7) is flex_masks.windowed
    # A window as long as the row is no window: one mask serves every layer.
    short = Transformer(tiny_config(attention=AttentionImpl.flex, sliding_window=32), 64)
    masks = short.attention_masks(None, 1, 24, seg.device)
    assert isinstance(masks, BlockMasks) and masks.windowed is None and masks.of(32) is masks.full


def test_sdpa_backend_priority() -> None:
    from torch.nn.attention import SDPBackend

    assert sdpa_priority(SdpaBackend.auto) is None
    order = sdpa_priority("cudnn")
    assert order is not None and order[0] == SDPBackend.CUDNN_ATTENTION and len(set(order)) == 4
    with pytest.raises(ValueError):
        sdpa_priority("fastest")


def test_flex_training_off_cuda_is_refused_naming_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.nn.attention.flex_attention as fa

    monkeypatch.undo()  # torch's own gate back
    assert fa._validate_device.__name__ == "_validate_device"
    from orchestra.model.config import ConfigError
    from tests.model.conftest import tiny_config

    model = Transformer(tiny_config(attention=AttentionImpl.flex), 64)
    tokens = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        model(tokens)  # a forward (evaluation) runs
    with pytest.raises(ConfigError, match=r"model.attention=flex: .*backward.*auto or sdpa"):
        model(tokens, tokens)


def test_generation_with_flex_matches_sdpa(case: tuple[Any, Transformer]) -> None:
    """A KV cache always takes SDPA's path: flex models decode as the others do."""
    from orchestra.model.generate import generate

    _, ours = case
    prompt = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(6))
    outs = [
        generate(_with_attention(ours, impl), prompt, max_new_tokens=5, temperature=0.0)
        for impl in (AttentionImpl.flex, AttentionImpl.sdpa)
    ]
    assert torch.equal(outs[0], outs[1])
