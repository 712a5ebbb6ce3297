"""The speed levers on CUDA, where their fast paths run: each against the eager reference.

The CPU suite checks the same levers through their reference paths (FlexAttention's dense
reference, compile on CPU, foreach vs fused AdamW on CPU); these run the compiled FlexAttention
kernel, the cuDNN / flash SDPA kernels, CUDA graphs and the allocator-measured memory probe.
Skipped without a GPU; bench/gpu_session.sh runs them in its correctness stage.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from orchestra.model.config import AttentionImpl, KernelBackend, ModelConfig, SdpaBackend
from orchestra.model.transformer import Transformer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")

VOCAB = 128
SHAPES = {
    "llama-gqa": {},
    "window": {"sliding_window": 24},
    "gemma2-like": {"sliding_window": 24, "global_every": 2, "attn_softcap": 20.0, "head_dim": 32},
}


@pytest.fixture(autouse=True)
def exact_matmuls() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def model(impl: AttentionImpl, kernels: KernelBackend = KernelBackend.torch, **shape: object) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(
        dim=128, n_layers=2, n_heads=8, n_kv_heads=2, ffn_dim=256, max_seq_len=128, kernels=kernels
    )
    return Transformer(dataclasses.replace(cfg, attention=impl, **shape), VOCAB).cuda()  # type: ignore[arg-type]


def twin(m: Transformer, **changes: object) -> Transformer:
    other = Transformer(dataclasses.replace(m.cfg, **changes), VOCAB).cuda()  # type: ignore[arg-type]
    other.load_state_dict(m.state_dict())
    return other


def loss_and_grads(
    m: torch.nn.Module, tokens: torch.Tensor, segment_ids: torch.Tensor | None
) -> tuple[float, list]:
    kwargs = {} if segment_ids is None else {"segment_ids": segment_ids}
    loss = m(tokens[:, :-1], tokens[:, 1:], **kwargs)
    loss.backward()
    return float(loss), [p.grad.clone() for p in m.parameters()]


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_compiled_flex_attention_equals_dense_sdpa(shape: str, packed: bool) -> None:
    flex = model(AttentionImpl.flex, **SHAPES[shape])
    ref = twin(flex, attention=AttentionImpl.repeat_kv)
    tokens = torch.randint(0, VOCAB, (2, 97), device="cuda")
    segments = None
    if packed:
        segments = torch.tensor([[0] * 30 + [1] * 40 + [2] * 26, [0] * 96], device="cuda")
    got_loss, got = loss_and_grads(flex, tokens, segments)
    want_loss, want = loss_and_grads(ref, tokens, segments)
    assert got_loss == pytest.approx(want_loss, rel=1e-5)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("backend", [SdpaBackend.cudnn, SdpaBackend.flash, SdpaBackend.efficient])
def test_preferred_sdpa_kernel_gives_the_math_kernels_logits(backend: SdpaBackend) -> None:
    ref = model(AttentionImpl.sdpa).to(torch.bfloat16)
    fast = twin(ref, sdpa_backend=backend).to(torch.bfloat16)
    math = twin(ref, sdpa_backend=SdpaBackend.math).to(torch.bfloat16)
    tokens = torch.randint(0, VOCAB, (2, 128), device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(fast(tokens), math(tokens), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_fullgraph_blocks_and_cuda_graphs_equal_eager(mode: str | None) -> None:
    eager = model(AttentionImpl.auto)
    compiled = copy.deepcopy(eager)
    for block in compiled.layers:
        block.compile(fullgraph=True, **({"mode": mode} if mode else {}))
    tokens = torch.randint(0, VOCAB, (2, 65), device="cuda")
    for _ in range(3):  # CUDA graphs are recorded on a warm-up call, then replayed
        for m in (eager, compiled):
            m.zero_grad(set_to_none=True)
        want_loss, want = loss_and_grads(eager, tokens, None)
        got_loss, got = loss_and_grads(compiled, tokens, None)
        assert got_loss == pytest.approx(want_loss, rel=1e-5)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def test_fused_residual_norm_kernel_in_the_block_equals_torch() -> None:
    triton = model(AttentionImpl.auto, kernels=KernelBackend.triton)
    ref = twin(triton, kernels=KernelBackend.torch)
    tokens = torch.randint(0, VOCAB, (2, 64), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):  # fp32 residual stream + bf16 sublayer outputs
        got_loss, _ = loss_and_grads(triton, tokens, None)
        want_loss, _ = loss_and_grads(ref, tokens, None)
    assert got_loss == pytest.approx(want_loss, rel=2e-2)


def test_fused_adamw_is_the_cuda_default_and_takes_foreach_steps() -> None:
    from orchestra.config import OptimConfig
    from orchestra.train.optim import build_optimizer

    params = {}
    for fused in (None, False):
        m = model(AttentionImpl.auto)
        opt = build_optimizer(m, OptimConfig(lr=1e-2, fused=fused))
        assert opt.defaults["fused"] is (fused is None)
        tokens = torch.randint(
            0, VOCAB, (2, 33), device="cuda", generator=torch.Generator("cuda").manual_seed(0)
        )
        for _ in range(5):
            loss_and_grads(m, tokens, None)
            opt.step()
            opt.zero_grad()
        params[fused] = [p.detach() for p in m.parameters()]
    for a, b in zip(params[None], params[False], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
