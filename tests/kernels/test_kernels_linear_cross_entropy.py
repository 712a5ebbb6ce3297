"""Chunked linear + cross-entropy against the float64 reference: loss, d hidden, d weight."""

from __future__ import annotations

import pytest
import torch

from tests.kernels.helpers import DEVICE, assert_close, leaf, leaf64

from orchestra.kernels import linear_cross_entropy as lce  # isort: skip
from orchestra.model.ops import torch_linear_cross_entropy  # isort: skip


@pytest.fixture(autouse=True)
def _narrow_vocab_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """16-wide vocabulary blocks, so every test row spans several blocks with a ragged last one."""
    monkeypatch.setattr(lce, "MAX_BLOCK_V", 16)


def _targets(n: int, vocab: int, ignored: str, ignore_index: int = -100) -> torch.Tensor:
    t = torch.randint(0, vocab, (n,))
    if ignored == "some":
        t[1::4] = ignore_index
    elif ignored == "chunk":  # rows 4..7: with chunk_size=4 one whole chunk is ignored
        t[4:8] = ignore_index
    elif ignored == "all":
        t[:] = ignore_index
    return t.to(DEVICE)


def _reference(h, w, t, **kw):
    h64, w64 = leaf64(h), leaf64(w)
    loss = torch_linear_cross_entropy(h64, w64, t.cpu(), **kw)
    return loss, h64, w64


@pytest.mark.parametrize(
    ("N", "D", "V", "chunk", "ignored", "dtype", "scale", "reduction", "z_loss", "rows"),
    [
        (13, 16, 37, 5, "some", torch.float32, 1.0, "mean", 0.0, 8),  # 8 rows per program, 5 used
        (20, 8, 100, 1, "some", torch.float32, 1.0, "sum", 1e-2, 8),
        (9, 12, 50, 4, "chunk", torch.float32, 30.0, "mean", 1e-3, 1),  # large logits, an ignored chunk
        (16, 24, 64, None, "none", torch.float32, 1e-3, "mean", 0.0, 4),  # tiny logits, default chunking
        (12, 16, 40, 5, "some", torch.bfloat16, 1.0, "mean", 0.0, 2),
    ],
)
def test_matches_float64_reference(
    monkeypatch, N, D, V, chunk, ignored, dtype, scale, reduction, z_loss, rows
):
    monkeypatch.setattr(lce, "MAX_TILE", 16 * rows)  # at most `rows` rows of 16-wide blocks per program
    h = leaf(torch.randn(N, D) * scale**0.5, dtype)
    w = leaf(torch.randn(V, D) * scale**0.5, dtype)
    t = _targets(N, V, ignored)
    loss = lce.linear_cross_entropy(h, w, t, reduction=reduction, z_loss=z_loss, chunk_size=chunk)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    (2.5 * loss).backward()  # an upstream gradient other than 1
    ref, h64, w64 = _reference(h, w, t, reduction=reduction, z_loss=z_loss)
    (2.5 * ref).backward()
    assert_close(loss, ref, dtype, "loss")
    assert h.grad.dtype == dtype and w.grad.dtype == dtype
    assert_close(h.grad, h64.grad, dtype, "dhidden")
    assert_close(w.grad, w64.grad, dtype, "dweight")


@pytest.mark.parametrize(("reduction", "z_loss"), [("mean", 0.0), ("mean", 1e-2), ("sum", 0.0)])
def test_every_target_ignored(reduction, z_loss):
    """Mean over no targets is NaN like F.cross_entropy; the gradients are zeros, never NaN."""
    h, w = leaf(torch.randn(6, 8)), leaf(torch.randn(10, 8))
    t = _targets(6, 10, "all")
    loss = lce.linear_cross_entropy(h, w, t, reduction=reduction, z_loss=z_loss, chunk_size=4)
    loss.backward()
    ref, _, _ = _reference(h, w, t, reduction=reduction, z_loss=z_loss)
    torch.testing.assert_close(loss.double().cpu(), ref, equal_nan=True)
    assert torch.isnan(loss).item() == (reduction == "mean")
    assert torch.equal(h.grad, torch.zeros_like(h)) and torch.equal(w.grad, torch.zeros_like(w))


def test_ignore_index_may_be_a_class_id():
    """ignore_index=3 drops rows whose target is class 3; other rows may still be 3's neighbours."""
    h, w = leaf(torch.randn(11, 8)), leaf(torch.randn(7, 8))
    t = _targets(11, 7, "some", ignore_index=3)
    loss = lce.linear_cross_entropy(h, w, t, ignore_index=3, chunk_size=3)
    loss.backward()
    ref, h64, w64 = _reference(h, w, t, ignore_index=3)
    ref.backward()
    assert_close(loss, ref, torch.float32, "loss")
    assert_close(h.grad, h64.grad, torch.float32, "dhidden")
    assert_close(w.grad, w64.grad, torch.float32, "dweight")


def test_gradients_only_where_asked():
    """No grad mode skips the gradient pass; a frozen weight gets no gradient computed."""
    h, w, t = torch.randn(10, 8, device=DEVICE), torch.randn(21, 8, device=DEVICE), _targets(10, 21, "some")
    ref, _, _ = _reference(h, w, t)
    with torch.no_grad():
        assert_close(lce.linear_cross_entropy(h, w, t, chunk_size=3), ref, torch.float32, "no-grad loss")
    hl = leaf(h)
    lce.linear_cross_entropy(hl, w, t, chunk_size=3).backward()
    ref, h64, _ = _reference(h, w, t)
    ref.backward()
    assert w.grad is None
    assert_close(hl.grad, h64.grad, torch.float32, "dhidden")


def test_second_backward_is_refused():
    """Gradients are scaled in place; autograd's version check must stop a second backward."""
    h, w = leaf(torch.randn(5, 8)), leaf(torch.randn(9, 8))
    loss = lce.linear_cross_entropy(h, w, _targets(5, 9, "none"))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):
        loss.backward()


def test_autocast_projects_in_the_autocast_dtype():
    """Under bf16 autocast the projection runs in bf16 (as F.linear would) and fp32 params get fp32 grads."""
    h, w, t = leaf(torch.randn(12, 16)), leaf(torch.randn(30, 16)), _targets(12, 30, "some")
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        loss = lce.linear_cross_entropy(h, w, t, chunk_size=5)
        ref = torch_linear_cross_entropy(h.detach().clone(), w.detach().clone(), t)
    loss.backward()
    assert h.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    hb, wb = leaf64(h.to(torch.bfloat16)), leaf64(w.to(torch.bfloat16))
    ref64 = torch_linear_cross_entropy(hb, wb, t.cpu())
    ref64.backward()
    assert_close(loss, ref.double(), torch.bfloat16, "loss vs autocast reference")
    assert_close(h.grad, hb.grad, torch.bfloat16, "dhidden")
    assert_close(w.grad, wb.grad, torch.bfloat16, "dweight")


def test_rejects_bad_arguments():
    h, w, t = torch.randn(4, 8), torch.randn(9, 8), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="reduction"):
        lce.linear_cross_entropy(h, w, t, reduction="none")
    with pytest.raises(ValueError, match="targets"):
        lce.linear_cross_entropy(h, w, t[:3])
    with pytest.raises(ValueError, match=r"\[V, D\]"):
        lce.linear_cross_entropy(h, w[:, :5], t)
    with pytest.raises(ValueError, match="chunk_size"):
        lce.linear_cross_entropy(h, w, t, chunk_size=0)
