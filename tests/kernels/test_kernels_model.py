"""The kernels inside the model: the ops table, the switch, and a 10-step training run vs torch."""

from __future__ import annotations

import pytest
import torch

from tests.kernels.helpers import DEVICE, K

from orchestra.config import KernelBackend, ModelConfig  # isort: skip
from orchestra.kernels import linear_cross_entropy, rms_norm, rope, swiglu  # isort: skip
from orchestra.model import Transformer  # isort: skip
from orchestra.model.ops import TORCH_OPS, get_ops  # isort: skip


def test_table_holds_the_fused_functions():
    ops = K.TRITON_OPS
    assert ops.name == "triton"
    assert ops.rms_norm is rms_norm.rms_norm and ops.apply_rope is rope.apply_rope
    assert (
        ops.swiglu is swiglu.swiglu and ops.linear_cross_entropy is linear_cross_entropy.linear_cross_entropy
    )


@pytest.mark.skipif(DEVICE == "cuda", reason="interpreter-mode selection is a CPU-only path")
def test_triton_on_cpu_runs_in_the_interpreter():
    assert K.INTERPRET
    assert get_ops(KernelBackend.triton, "cpu") is K.TRITON_OPS
    assert get_ops(KernelBackend.auto, "cpu") is TORCH_OPS  # auto never picks the slow interpreter


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_file_references_are_the_model_references(dtype):
    """Each kernel file's reference is TORCH_OPS' function (the file copies stay in step)."""
    x, w = torch.randn(3, 5, 16, dtype=dtype), torch.randn(16, dtype=dtype)
    torch.testing.assert_close(rms_norm.rms_norm_reference(x, w, 1e-5), TORCH_OPS.rms_norm(x, w, 1e-5))
    q, k, cos, sin = (
        torch.randn(2, 4, 5, 8, dtype=dtype),
        torch.randn(2, 2, 5, 8, dtype=dtype),
        *torch.randn(2, 5, 8),
    )
    for a, b in zip(
        rope.apply_rope_reference(q, k, cos, sin), TORCH_OPS.apply_rope(q, k, cos, sin), strict=True
    ):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(swiglu.swiglu_reference(x, x * 2), TORCH_OPS.swiglu(x, x * 2))
    h, wv, t = torch.randn(6, 16, dtype=dtype), torch.randn(11, 16, dtype=dtype), torch.randint(0, 11, (6,))
    t[2] = -100
    torch.testing.assert_close(
        linear_cross_entropy.linear_cross_entropy_reference(h, wv, t),
        TORCH_OPS.linear_cross_entropy(h, wv, t),
    )


def _train(kernels: KernelBackend, steps: int = 10) -> tuple[list[float], Transformer]:
    """AdamW on one fixed batch (so the loss falls), from the same seeded init."""
    torch.manual_seed(0)
    cfg = ModelConfig(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=160, max_seq_len=32, kernels=kernels
    )
    model = Transformer(cfg, vocab_size=96).to(DEVICE)
    assert model.ops.name == kernels.value
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    tokens = torch.randint(0, 96, (2, 17), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    inputs, targets = tokens[:, :-1], tokens[:, 1:].clone()
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
def test_ten_training_steps_match_torch():
    ref_losses, ref_model = _train(KernelBackend.torch)
    losses, model = _train(KernelBackend.triton)
    assert ref_losses[-1] < ref_losses[0] - 0.5  # the run actually learns something
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=2e-5)
    for (name, p), p_ref in zip(model.named_parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(p, p_ref, rtol=1e-4, atol=5e-5, msg=lambda m, name=name: f"{name}: {m}")
