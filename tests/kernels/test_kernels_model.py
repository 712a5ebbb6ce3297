"""The kernels inside the model: the Triton table, the switch, and a 10-step training run vs torch."""

from __future__ import annotations

import pytest
import torch

from tests.kernels.helpers import DEVICE, K

from orchestra.config import KernelBackend, ModelConfig  # isort: skip
from orchestra.model import Transformer, build_model  # isort: skip
from orchestra.model.ops import TORCH_OPS, get_ops  # isort: skip
from orchestra.model.transformer import rope_cache  # isort: skip


@pytest.mark.skipif(DEVICE == "cuda", reason="interpreter-mode selection is a CPU-only path")
def test_triton_on_cpu_runs_in_the_interpreter() -> None:
    assert K.INTERPRET
    assert get_ops(KernelBackend.triton, "cpu").name == "triton"
    assert get_ops(KernelBackend.auto, "cpu") is TORCH_OPS  # auto never picks the slow interpreter


def test_triton_table_runs_the_fused_kernels() -> None:
    """Each op of the Triton table records its kernel's autograd Function, not PyTorch's ops."""
    ops = get_ops(KernelBackend.triton, DEVICE)
    x = torch.randn(3, 8, device=DEVICE, requires_grad=True)
    q = torch.randn(1, 2, 3, 8, device=DEVICE, requires_grad=True)
    cos, sin = rope_cache(8, 3, 10000.0, DEVICE)
    targets = torch.tensor([1, -100, 2], device=DEVICE)
    nodes = {
        "RMSNormFunctionBackward": ops.rms_norm(x, torch.ones(8, device=DEVICE), 1e-5),
        "RopeFunctionBackward": ops.apply_rope(q, q, cos, sin)[0],
        "SwiGLUFunctionBackward": ops.swiglu(x, x),
        "AddRMSNormFunctionBackward": ops.add_rms_norm(x, x, torch.ones(8, device=DEVICE), 1e-5)[0],
        "LinearCrossEntropyFunctionBackward": ops.linear_cross_entropy(x, x, targets),
    }
    assert {name: type(out.grad_fn).__name__ for name, out in nodes.items()} == {n: n for n in nodes}


def _train(kernels: KernelBackend, steps: int = 10) -> tuple[list[float], Transformer]:
    """AdamW on one fixed batch (so the loss falls), from the same seeded init."""
    torch.manual_seed(0)
    cfg = ModelConfig(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=160, max_seq_len=32, kernels=kernels
    )
    model = build_model(cfg, 96, device=DEVICE)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    tokens = torch.randint(0, 96, (2, 17), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    inputs, targets = tokens[:, :-1], tokens[:, 1:].clone()
    assert model.ops.table(inputs).name == kernels.value
    targets[0, :3] = -100  # some ignored positions, as padding would give
    losses = []
    for _ in range(steps):
        loss = model(inputs, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, model


@pytest.mark.slow  # ~10 s in the interpreter
def test_ten_training_steps_match_torch() -> None:
    ref_losses, ref_model = _train(KernelBackend.torch)
    losses, model = _train(KernelBackend.triton)
    assert ref_losses[-1] < ref_losses[0] - 0.5  # the run actually learns something
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=2e-5)
    for (name, p), p_ref in zip(model.named_parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(p, p_ref, rtol=1e-4, atol=5e-5, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.skipif(DEVICE != "cuda", reason="needs a GPU to build on")
def test_model_built_on_the_gpu_runs_on_cpu_with_torch_ops() -> None:
    """kernels=auto on a GPU machine: Triton for CUDA tensors, and after .cpu() PyTorch, not Triton."""
    torch.manual_seed(0)
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=160, max_seq_len=32)
    model = build_model(cfg, 96, device=DEVICE)
    tokens = torch.randint(0, 96, (2, 16), device=DEVICE)
    assert model.ops.table(tokens).name == "triton"
    gpu_loss = model(tokens, tokens)
    model.cpu()
    cpu_tokens = tokens.cpu()
    assert model.ops.table(cpu_tokens) is TORCH_OPS
    torch.testing.assert_close(model(cpu_tokens, cpu_tokens), gpu_loss.cpu(), rtol=1e-4, atol=1e-4)


# Each family's switches at once; the Triton table fuses what it covers and hands the rest to torch.
FAMILY_VARIANTS = {
    "qwen2": dict(qkv_bias=True),
    "qwen3": dict(qk_norm=True, head_dim=24),
    "mistral": dict(sliding_window=5),
    "gemma2": dict(
        norm_offset=1.0,
        activation="gelu_tanh",
        scale_embeddings=True,
        sandwich_norm=True,
        attn_softcap=4.0,
        final_softcap=3.0,
        attn_scale=0.2,
        sliding_window=5,
        global_every=2,
    ),
    "llama31": dict(rope={"type": "llama3", "factor": 8.0, "original_max_seq_len": 8}),
}


@pytest.mark.parametrize("variant", list(FAMILY_VARIANTS))
def test_family_variants_under_triton_match_torch_with_one_logged_fallback(
    variant: str, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    from orchestra.model.ops import VARIANTS

    base = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=32)
    plain = ModelConfig.from_dict({**base, **FAMILY_VARIANTS[variant], "kernels": "torch"})
    fused = ModelConfig.from_dict({**base, **FAMILY_VARIANTS[variant], "kernels": "triton"})
    torch.manual_seed(0)
    ref = build_model(plain, 96, device=DEVICE)
    model = build_model(fused, 96, device=DEVICE)
    model.load_state_dict(ref.state_dict())
    tokens = torch.randint(0, 96, (2, 13), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    targets = tokens.roll(-1, dims=1)
    with caplog.at_level(logging.INFO, logger="orchestra.model.ops"):
        for _ in range(2):  # the reason is logged once per op, not per call
            loss = model(tokens, targets)
            loss.backward()
    expected = ref(tokens, targets)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-4)
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
        assert p.grad is not None and q.grad is not None
        torch.testing.assert_close(p.grad / 2, q.grad, rtol=1e-3, atol=1e-4, msg=name)
    lines = [r.getMessage() for r in caplog.records if "do not cover" in r.getMessage()]
    used = {
        "norm_offset": plain.norm_offset != 0,
        "gelu_tanh": plain.activation.value == "gelu_tanh",
        "logit_softcap": plain.final_softcap is not None,
    }
    assert sorted(lines) == sorted(
        f"model.kernels: the triton kernels do not cover {VARIANTS[v]}; that op runs in torch"
        for v, on in used.items()
        if on
    )
