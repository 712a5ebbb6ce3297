"""Fused RoPE against its float64 reference: q and k outputs and gradients, layouts kept."""

from __future__ import annotations

import pytest
import torch

from tests.kernels.helpers import DEVICE, assert_close, leaf, leaf64

from orchestra.kernels import rope  # isort: skip
from orchestra.model.ops import torch_apply_rope  # isort: skip
from orchestra.model.transformer import rope_cache  # isort: skip


def _projection_layout(B: int, H: int, T: int, hd: int, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """[B, H, T, hd] as the model makes it: a transposed view of a [B, T, H, hd] projection."""
    return leaf(torch.randn(B, T, H, hd) * scale, dtype).detach().transpose(1, 2).requires_grad_(True)


@pytest.mark.parametrize(
    ("B", "H", "Hkv", "T", "hd", "dtype", "scale", "tables", "max_tile"),
    [
        (2, 4, 2, 5, 16, torch.float32, 1.0, "cache", 4096),  # all positions in one masked block
        (1, 3, 3, 7, 12, torch.float32, 1e-4, "random", 4096),  # non-power-of-two half (6), tiny values
        (3, 6, 1, 9, 10, torch.float32, 1e4, "random", 128),  # MQA, large values, 2 positions/program
        (2, 4, 2, 6, 16, torch.bfloat16, 1.0, "cache", 32),  # one position per program
    ],
)
def test_matches_float64_reference(monkeypatch, B, H, Hkv, T, hd, dtype, scale, tables, max_tile):
    monkeypatch.setattr(rope, "MAX_TILE", max_tile)
    q = _projection_layout(B, H, T, hd, scale, dtype)
    k = leaf(torch.randn(B, Hkv, T, hd) * scale, dtype)
    if tables == "cache":
        cos, sin = rope_cache(hd, 2 * T, 10000.0, DEVICE)
        cos, sin = cos[T // 2 : T // 2 + T], sin[T // 2 : T // 2 + T]  # a slice, as at decode time
    else:  # independent halves exercise the general (c1, c2, s1, s2) formula
        cos, sin = torch.randn(T, hd, device=DEVICE), torch.randn(T, hd, device=DEVICE)
    qo, ko = rope.apply_rope(q, k, cos, sin)
    assert qo.dtype == dtype and qo.shape == q.shape and ko.shape == k.shape
    assert qo.stride() == q.stride() and ko.stride() == k.stride()  # the layout SDPA sees is kept
    dq, dk = torch.randn_like(qo), torch.randn_like(ko)
    torch.autograd.backward((qo, ko), (dq, dk))

    q64, k64 = leaf64(q), leaf64(k)
    qr, kr = torch_apply_rope(q64, k64, cos.cpu().to(dtype).double(), sin.cpu().to(dtype).double())
    torch.autograd.backward((qr, kr), (dq.cpu().double(), dk.cpu().double()))
    assert_close(qo, qr, dtype, "q")
    assert_close(ko, kr, dtype, "k")
    assert_close(q.grad, q64.grad, dtype, "dq")
    assert_close(k.grad, k64.grad, dtype, "dk")


def test_only_q_used_still_gives_both_gradients():
    """An unused output's gradient arrives as zeros; the backward must still write dk."""
    q, k = leaf(torch.randn(1, 2, 3, 8)), leaf(torch.randn(1, 2, 3, 8))
    cos, sin = rope_cache(8, 3, 10000.0, DEVICE)
    qo, _ = rope.apply_rope(q, k, cos, sin)
    qo.sum().backward()
    assert torch.equal(k.grad, torch.zeros_like(k))
    q64 = leaf64(q)
    torch_apply_rope(q64, q64.detach(), cos.cpu().double(), sin.cpu().double())[0].sum().backward()
    assert_close(q.grad, q64.grad, torch.float32, "dq")


def test_rejects_bad_shapes():
    q = torch.randn(1, 2, 3, 8, device=DEVICE)
    cos = torch.randn(3, 8, device=DEVICE)
    with pytest.raises(ValueError, match="cos"):
        rope.apply_rope(q, q, cos[:2], cos)
    with pytest.raises(ValueError, match="even"):
        rope.apply_rope(q[..., :7], q[..., :7], cos[:, :7], cos[:, :7])
