"""Every kernel on seeded random shapes (odd sizes, non-powers of two) against its float64 reference.

The other kernel tests pick shapes by hand to reach specific code paths; these draw them, so a
path nobody thought of gets a chance too. Shapes stay small: the CPU suite runs the interpreter.
"""

from __future__ import annotations

import random

import pytest
import torch

from tests.kernels.helpers import DEVICE, assert_close, leaf, leaf64

from orchestra.kernels import linear_cross_entropy as lce  # isort: skip
from orchestra.kernels import rms_norm as rn  # isort: skip
from orchestra.kernels import rope  # isort: skip
from orchestra.kernels import swiglu as sg  # isort: skip
from orchestra.model.ops import (  # isort: skip
    torch_apply_rope,
    torch_linear_cross_entropy,
    torch_rms_norm,
    torch_swiglu,
)

SEEDS = [11, 23, 37]


@pytest.mark.parametrize("seed", SEEDS)
def test_rms_norm_random_shape(seed: int) -> None:
    rng = random.Random(seed)
    shape = (rng.randint(1, 4), rng.randint(1, 19), rng.randint(1, 150))
    x, w = leaf(torch.randn(shape)), leaf(1 + 0.3 * torch.randn(shape[-1]))
    y = rn.rms_norm(x, w, 1e-5)
    dy = torch.randn_like(y)
    y.backward(dy)
    x64, w64 = leaf64(x), leaf64(w)
    y64 = torch_rms_norm(x64, w64, 1e-5)
    y64.backward(dy.cpu().double())
    assert_close(y, y64, torch.float32, f"y {shape}")
    assert_close(x.grad, x64.grad, torch.float32, f"dx {shape}")
    assert_close(w.grad, w64.grad, torch.float32, f"dw {shape}")


@pytest.mark.parametrize("seed", SEEDS)
def test_swiglu_random_shape(seed: int) -> None:
    rng = random.Random(seed)
    shape = (rng.randint(1, 5), rng.randint(1, 3000))
    g, u = leaf(2 * torch.randn(shape)), leaf(torch.randn(shape))
    y = sg.swiglu(g, u)
    dy = torch.randn_like(y)
    y.backward(dy)
    g64, u64 = leaf64(g), leaf64(u)
    torch_swiglu(g64, u64).backward(dy.cpu().double())
    assert_close(y, torch_swiglu(g64.detach(), u64.detach()), torch.float32, f"y {shape}")
    assert_close(g.grad, g64.grad, torch.float32, f"dg {shape}")
    assert_close(u.grad, u64.grad, torch.float32, f"du {shape}")


@pytest.mark.parametrize("seed", SEEDS)
def test_rope_random_shape(seed: int) -> None:
    rng = random.Random(seed)
    kv = rng.randint(1, 3)
    B, H, T, hd = rng.randint(1, 3), kv * rng.randint(1, 3), rng.randint(1, 13), 2 * rng.randint(1, 20)
    q, k = leaf(torch.randn(B, H, T, hd)), leaf(torch.randn(B, kv, T, hd))
    cos, sin = torch.randn(T, hd, device=DEVICE), torch.randn(T, hd, device=DEVICE)
    qo, ko = rope.apply_rope(q, k, cos, sin)
    dq, dk = torch.randn_like(qo), torch.randn_like(ko)
    torch.autograd.backward((qo, ko), (dq, dk))
    q64, k64 = leaf64(q), leaf64(k)
    qr, kr = torch_apply_rope(q64, k64, cos.cpu().double(), sin.cpu().double())
    torch.autograd.backward((qr, kr), (dq.cpu().double(), dk.cpu().double()))
    shape = (B, H, kv, T, hd)
    assert_close(qo, qr, torch.float32, f"q {shape}")
    assert_close(ko, kr, torch.float32, f"k {shape}")
    assert_close(q.grad, q64.grad, torch.float32, f"dq {shape}")
    assert_close(k.grad, k64.grad, torch.float32, f"dk {shape}")


@pytest.mark.parametrize("seed", SEEDS)
def test_linear_cross_entropy_random_shape(monkeypatch: pytest.MonkeyPatch, seed: int) -> None:
    monkeypatch.setattr(lce, "MAX_BLOCK_V", 16)  # several vocabulary blocks, a ragged last one
    rng = random.Random(seed)
    N, D, V = rng.randint(1, 23), rng.randint(1, 40), rng.randint(2, 90)
    chunk = rng.choice([None, rng.randint(1, N)])
    reduction = rng.choice(["mean", "sum"])
    h, w = leaf(torch.randn(N, D)), leaf(torch.randn(V, D) * 0.5)
    t = torch.randint(0, V, (N,))
    t[torch.rand(N) < 0.3] = -100
    t[0] = rng.randrange(V)  # at least one row counts
    t = t.to(DEVICE)
    loss = lce.linear_cross_entropy(h, w, t, reduction=reduction, chunk_size=chunk)
    loss.backward()
    h64, w64 = leaf64(h), leaf64(w)
    ref = torch_linear_cross_entropy(h64, w64, t.cpu(), reduction=reduction)
    ref.backward()
    shape = (N, D, V, chunk, reduction)
    assert_close(loss, ref, torch.float32, f"loss {shape}")
    assert_close(h.grad, h64.grad, torch.float32, f"dh {shape}")
    assert_close(w.grad, w64.grad, torch.float32, f"dw {shape}")
