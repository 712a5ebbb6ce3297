"""Fused SwiGLU against its float64 reference, across blocks and at extreme gate values."""

from __future__ import annotations

import pytest
import torch

from tests.kernels.helpers import assert_close, leaf, leaf64

from orchestra.kernels import swiglu as sg  # isort: skip
from orchestra.model.ops import torch_swiglu  # isort: skip


@pytest.mark.parametrize(
    ("shape", "dtype", "scale"),
    [
        ((7,), torch.float32, 1.0),
        ((2, 5, 4099), torch.float32, 3.0),  # several programs, ragged last block
        ((3, 50), torch.float32, 1e-4),
        ((4, 33), torch.bfloat16, 2.0),
    ],
)
def test_matches_float64_reference(shape, dtype, scale):
    g, u = leaf(torch.randn(shape) * scale, dtype), leaf(torch.randn(shape), dtype)
    y = sg.swiglu(g, u)
    dy = torch.randn_like(y)
    y.backward(dy)
    g64, u64 = leaf64(g), leaf64(u)
    y64 = torch_swiglu(g64, u64)
    y64.backward(dy.cpu().double())
    assert y.dtype == dtype
    assert_close(y, y64, dtype, "y")
    assert_close(g.grad, g64.grad, dtype, "dgate")
    assert_close(u.grad, u64.grad, dtype, "dup")


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # interpreter's numpy
def test_saturated_gates_stay_finite():
    """exp overflows inside sigmoid for |g| ~ 1000; the result must still be exact, not NaN."""
    g = leaf(torch.tensor([-1000.0, -100.0, -1e-30, 0.0, 1e-30, 100.0, 1000.0]))
    u = leaf(torch.linspace(-2, 2, 7))
    y = sg.swiglu(g, u)
    y.backward(torch.ones_like(y))
    g64, u64 = leaf64(g), leaf64(u)
    torch_swiglu(g64, u64).backward(torch.ones(7, dtype=torch.float64))
    assert torch.isfinite(g.grad).all() and torch.isfinite(u.grad).all()
    assert_close(y, torch_swiglu(g64, u64), torch.float32, "y")
    assert_close(g.grad, g64.grad, torch.float32, "dgate")
    assert_close(u.grad, u64.grad, torch.float32, "dup")


def test_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="must match"):
        sg.swiglu(torch.randn(3, 4), torch.randn(3, 5))
