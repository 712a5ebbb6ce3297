"""Fused RMSNorm against its float64 reference: output, input gradient, weight gradient."""

from __future__ import annotations

import pytest
import torch

from tests.kernels.helpers import DEVICE, assert_close, leaf, leaf64

from orchestra.kernels import add_rms_norm as arn  # isort: skip
from orchestra.kernels import rms_norm as rn  # isort: skip
from orchestra.model.ops import torch_rms_norm  # isort: skip

EPS = 1e-5


def _reference(x, w, dy):
    x64, w64 = leaf64(x), leaf64(w)
    y64 = torch_rms_norm(x64, w64, EPS)
    y64.backward(dy.detach().cpu().double())
    return y64, x64.grad, w64.grad


@pytest.mark.parametrize(
    ("shape", "dtype", "w_dtype", "scale"),
    [
        ((1, 7), torch.float32, torch.float32, 1.0),
        ((5, 3, 33), torch.float32, torch.float32, 1e-4),  # tiny values: eps matters
        ((37, 100), torch.float32, torch.float32, 1e4),  # large values
        ((2, 9, 64), torch.bfloat16, torch.bfloat16, 1.0),
        ((6, 48), torch.bfloat16, torch.float32, 3.0),  # bf16 activations, fp32 gain: fp32 out
    ],
)
def test_matches_float64_reference(shape, dtype, w_dtype, scale):
    x = leaf(torch.randn(shape) * scale, dtype)
    w = leaf(1 + 0.5 * torch.randn(shape[-1]), w_dtype)
    y = rn.rms_norm(x, w, EPS)
    assert y.dtype == torch.promote_types(dtype, w_dtype) and y.shape == x.shape
    dy = torch.randn(shape, device=DEVICE).to(y.dtype)
    y.backward(dy)
    y64, dx64, dw64 = _reference(x, w, dy)
    assert_close(y, y64, dtype, "y")
    assert x.grad.dtype == dtype and w.grad.dtype == w_dtype
    assert_close(x.grad, dx64, dtype, "dx")
    assert_close(w.grad, dw64, dtype, "dw")


def test_strided_input():
    """A transposed (non-unit last stride) input is handled, not read with the wrong strides."""
    x = leaf(torch.randn(24, 10)).t()  # [10, 24], stride (1, 10)
    w = leaf(torch.randn(24))
    y = rn.rms_norm(x, w, EPS)
    dy = torch.randn_like(y)
    y.backward(dy)
    y64, _, dw64 = _reference(x, w, dy)
    assert_close(y, y64, torch.float32, "y")
    assert_close(w.grad, dw64, torch.float32, "dw")


@pytest.mark.parametrize("n_programs", [1, 5, 12, 50])
def test_weight_gradient_partial_sums(monkeypatch, n_programs):
    """Several rows per tile, tiles split unevenly over the persistent grid, partials reduced."""
    monkeypatch.setattr(rn, "MAX_TILE", 64)  # D=20 -> BLOCK_D=32, 2 rows per tile, 12 tiles
    x = torch.randn(23, 20, device=DEVICE)
    w = torch.randn(20, device=DEVICE)
    dy = torch.randn(23, 20, device=DEVICE)
    y, rstd, h = rn.rms_norm_forward(x, w, EPS)
    assert h is x
    dx, dw = rn.rms_norm_backward(dy, x, w, rstd, n_programs=n_programs)
    y64, dx64, dw64 = _reference(x, w, dy)
    assert_close(y, y64, torch.float32, "y")
    assert_close(rstd, torch.rsqrt(x.double().pow(2).mean(-1) + EPS), torch.float32, "rstd")
    assert_close(dx, dx64, torch.float32, "dx")
    assert_close(dw, dw64, torch.float32, "dw")


def test_rejects_mismatched_weight():
    with pytest.raises(ValueError, match="weight"):
        rn.rms_norm(torch.randn(3, 8, device=DEVICE), torch.randn(7, device=DEVICE), EPS)


@pytest.mark.parametrize(
    ("shape", "dtype", "scale"),
    [((3, 5, 40), torch.float32, 1.0), ((23, 20), torch.float32, 1e3), ((4, 64), torch.bfloat16, 1.0)],
)
def test_add_rms_norm_matches_float64_reference(shape, dtype, scale):
    """Stretch op: both outputs used downstream, so both gradient paths meet in d x = d residual."""
    x, r = leaf(torch.randn(shape) * scale, dtype), leaf(torch.randn(shape) * scale, dtype)
    w = leaf(1 + 0.5 * torch.randn(shape[-1]), dtype)
    y, h = arn.add_rms_norm(x, r, w, EPS)
    dy, dh = torch.randn_like(y), torch.randn_like(h)
    torch.autograd.backward((y, h), (dy, dh))
    x64, r64, w64 = leaf64(x), leaf64(r), leaf64(w)
    h64 = x64 + r64  # the reference: the residual add, then the model's RMSNorm
    y64 = torch_rms_norm(h64, w64, EPS)
    torch.autograd.backward((y64, h64), (dy.cpu().double(), dh.cpu().double()))
    assert_close(h, h64, dtype, "h")
    assert_close(y, y64, dtype, "y")
    assert_close(x.grad, x64.grad, dtype, "dx")
    assert_close(r.grad, r64.grad, dtype, "dresidual")
    assert_close(w.grad, w64.grad, dtype, "dw")


def test_add_rms_norm_takes_a_narrower_residual_as_torch_promotes():
    """The fp32 residual stream plus a bf16 sublayer output (autocast): the sum is torch's fp32 sum."""
    x = leaf(torch.randn(6, 48), torch.float32)
    r = leaf(torch.randn(6, 48), torch.bfloat16)
    w = leaf(1 + 0.5 * torch.randn(48), torch.float32)
    y, h = arn.add_rms_norm(x, r, w, EPS)
    assert h.dtype == torch.float32 and y.dtype == torch.float32
    dy, dh = torch.randn_like(y), torch.randn_like(h)
    torch.autograd.backward((y, h), (dy, dh))
    xr, rr, wr = (t.detach().clone().requires_grad_(True) for t in (x, r, w))
    h_ref = xr + rr  # torch: bf16 upcast, added in fp32
    y_ref = torch_rms_norm(h_ref, wr, EPS)
    torch.autograd.backward((y_ref, h_ref), (dy, dh))
    assert r.grad is not None and r.grad.dtype == torch.bfloat16  # autograd casts it back
    assert_close(h, h_ref, torch.float32, "h")
    assert_close(y, y_ref, torch.float32, "y")
    assert_close(x.grad, xr.grad, torch.float32, "dx")
    assert_close(r.grad, rr.grad, torch.bfloat16, "dresidual")
    assert_close(w.grad, wr.grad, torch.float32, "dw")


def test_add_rms_norm_refuses_a_wider_residual():
    x, r = torch.randn(3, 8, device=DEVICE, dtype=torch.bfloat16), torch.randn(3, 8, device=DEVICE)
    with pytest.raises(ValueError, match="no wider"):
        arn.add_rms_norm(x, r, torch.ones(8, device=DEVICE), EPS)
