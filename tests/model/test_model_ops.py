"""The ops table: selection by model.kernels and the reference numerics."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

from orchestra.config import ConfigError, KernelBackend
from orchestra.model import Transformer
from orchestra.model.ops import TORCH_OPS, Ops, get_ops


@pytest.fixture
def no_triton_kernels(monkeypatch):
    """Make `from orchestra.kernels import TRITON_OPS` fail, whatever this build contains."""
    monkeypatch.setitem(sys.modules, "orchestra.kernels", None)


def test_torch_and_auto_on_cpu_are_the_reference():
    assert get_ops(KernelBackend.torch, "cpu") is TORCH_OPS
    assert get_ops("torch", "cuda") is TORCH_OPS
    assert get_ops(KernelBackend.auto, "cpu") is TORCH_OPS
    assert isinstance(TORCH_OPS, Ops)


def test_auto_on_cuda_falls_back_without_kernels(no_triton_kernels):
    assert get_ops("auto", "cuda") is TORCH_OPS


def test_triton_without_kernels_is_a_config_error(no_triton_kernels):
    with pytest.raises(ConfigError, match=r"model.kernels=triton.*not available in this build.*torch or"):
        get_ops(KernelBackend.triton, "cuda")


def test_triton_without_kernels_on_cpu_is_a_config_error(no_triton_kernels, make_cfg):
    with pytest.raises(ConfigError, match=r"model.kernels=triton.*not available in this build"):
        get_ops("triton", "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"model.kernels=triton"):
            Transformer(make_cfg(kernels=KernelBackend.triton), 64)


def test_unknown_backend_lists_the_choices():
    with pytest.raises(ConfigError, match=r"'cuda'.*\['auto', 'torch', 'triton'\]"):
        get_ops("cuda", "cpu")


def test_triton_picks_the_kernels_table_when_present(monkeypatch):
    fake = Ops(
        "fake", TORCH_OPS.rms_norm, TORCH_OPS.apply_rope, TORCH_OPS.swiglu, TORCH_OPS.linear_cross_entropy
    )

    class FakeKernels:
        TRITON_OPS = fake

    monkeypatch.setitem(sys.modules, "orchestra.kernels", FakeKernels)
    assert get_ops("triton", "cuda") is fake
    assert get_ops("auto", "cuda") is fake
    assert get_ops("auto", "cpu") is TORCH_OPS
    with pytest.raises(ConfigError, match=r"model.kernels=triton.*CUDA.*'cpu'.*torch.*TRITON_INTERPRET=1"):
        get_ops("triton", "cpu")


def test_triton_on_cpu_in_interpreter_mode(monkeypatch):
    """Kernels built for Triton's CPU interpreter are accepted off CUDA, but only when asked for."""
    fake = Ops(
        "fake", TORCH_OPS.rms_norm, TORCH_OPS.apply_rope, TORCH_OPS.swiglu, TORCH_OPS.linear_cross_entropy
    )

    class InterpretedKernels:
        TRITON_OPS = fake
        INTERPRET = True

    monkeypatch.setitem(sys.modules, "orchestra.kernels", InterpretedKernels)
    assert get_ops("triton", "cpu") is fake
    assert get_ops("auto", "cpu") is TORCH_OPS  # auto never picks the ~2000x slower interpreter
    assert get_ops("auto", "cuda") is fake


def test_rms_norm_fp32_math_and_dtype():
    x = torch.randn(3, 5, 64)
    w = torch.randn(64)
    out = TORCH_OPS.rms_norm(x, w, 1e-5)
    ref = w * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(out, ref)
    xb = x.to(torch.bfloat16)
    ob = TORCH_OPS.rms_norm(xb, w.to(torch.bfloat16), 1e-5)
    assert ob.dtype == torch.bfloat16
    torch.testing.assert_close(ob.float(), ref, rtol=2e-2, atol=2e-2)


def _rotate_pairs_reference(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """RoPE written independently: dim i pairs with i + d/2, rotated by angle pos * theta^(-2i/d)."""
    d = x.shape[-1]
    inv = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = pos.double()[:, None] * inv[None, :]
    c = torch.complex(x[..., : d // 2].double(), x[..., d // 2 :].double()) * torch.polar(
        torch.ones_like(ang), ang
    )
    return torch.cat([c.real, c.imag], dim=-1).float()


def test_apply_rope_matches_complex_rotation():
    from orchestra.model.transformer import rope_cache

    T, hd, theta = 12, 16, 10000.0
    cos, sin = rope_cache(hd, T, theta)
    q, k = torch.randn(2, 4, T, hd), torch.randn(2, 2, T, hd)
    qr, kr = TORCH_OPS.apply_rope(q, k, cos, sin)
    pos = torch.arange(T)
    torch.testing.assert_close(qr, _rotate_pairs_reference(q, pos, theta), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kr, _rotate_pairs_reference(k, pos, theta), rtol=1e-5, atol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
    from orchestra.model.transformer import rope_cache

    hd = 16
    cos, sin = rope_cache(hd, 32, 10000.0)
    q, k = torch.randn(1, 1, 1, hd), torch.randn(1, 1, 1, hd)

    def score(m: int, n: int) -> torch.Tensor:
        qm, _ = TORCH_OPS.apply_rope(q, q, cos[m : m + 1], sin[m : m + 1])
        kn, _ = TORCH_OPS.apply_rope(k, k, cos[n : n + 1], sin[n : n + 1])
        return (qm * kn).sum()

    torch.testing.assert_close(score(5, 2), score(20, 17), rtol=1e-5, atol=1e-5)


def test_swiglu():
    g, u = torch.randn(4, 8), torch.randn(4, 8)
    torch.testing.assert_close(TORCH_OPS.swiglu(g, u), g * torch.sigmoid(g) * u)


def test_linear_cross_entropy_reference_and_ignore_index():
    h, w = torch.randn(10, 32), torch.randn(37, 32)
    t = torch.randint(0, 37, (10,))
    t[[1, 4]] = -100
    loss = TORCH_OPS.linear_cross_entropy(h, w, t)
    logits = h @ w.T
    keep = t != -100
    torch.testing.assert_close(loss, F.cross_entropy(logits[keep], t[keep]))
    t2 = t.clone()
    t2[t2 == -100] = 7
    t2[[1, 4]] = -1
    torch.testing.assert_close(TORCH_OPS.linear_cross_entropy(h, w, t2, ignore_index=-1), loss)
    hb = h.to(torch.bfloat16)
    lb = TORCH_OPS.linear_cross_entropy(hb, w.to(torch.bfloat16), t)
    assert lb.dtype == torch.float32
