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
