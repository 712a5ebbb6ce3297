"""Fused rotary embedding for q and k in one launch, forward and backward.

HF's rotate_half convention: dim i pairs with dim i + head_dim/2, so for the two halves
(x1, x2) of a head and the matching halves (c1, c2), (s1, s2) of cos/sin,

    y1 = x1 * c1 - x2 * s1        y2 = x2 * c2 + x1 * s2

and the backward is the transposed rotation (dx1 = dy1 * c1 + dy2 * s2, dx2 = dy2 * c2 - dy1 * s1),
i.e. the same kernel with the sign of sin flipped, nothing saved but cos/sin. One program handles
a few consecutive positions of one sequence: it loads their cos/sin once and rotates every q and
k head there.
q/k may be strided views (the model passes transposed projections); outputs keep q/k's layout.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import empty, num_warps_for

# Elements of one head-group tile ([positions, heads, head_dim / 2]) a program holds; tests lower it.
MAX_TILE = 4096


@triton.jit
def _rotate_heads(
    X,
    Y,
    b,
    t,
    t_mask,
    n_heads,
    sx_b,
    sx_h,
    sx_t,
    sy_b,
    sy_h,
    sy_t,
    c1,
    c2,
    s1,
    s2,
    half,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    # Tiles are [positions, heads, half of head_dim]; cos/sin ([positions, half]) broadcast over heads.
    heads = tl.arange(0, BLOCK_H).to(tl.int64)[None, :, None]
    d = tl.arange(0, BLOCK_HALF)[None, None, :]
    tt = t[:, None, None]
    mask = t_mask[:, None, None] & (heads < n_heads) & (d < half)
    x_ptr = X + b * sx_b + tt * sx_t + heads * sx_h + d
    y_ptr = Y + b * sy_b + tt * sy_t + heads * sy_h + d
    x1 = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + half, mask=mask, other=0.0).to(tl.float32)
    y1 = x1 * c1[:, None, :] - x2 * s1[:, None, :]
    y2 = x2 * c2[:, None, :] + x1 * s2[:, None, :]
    tl.store(y_ptr, y1.to(Y.dtype.element_ty), mask=mask)
    tl.store(y_ptr + half, y2.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(
    Q,
    K,
    QO,
    KO,
    COS,
    SIN,
    seq_len,
    n_qh,
    n_kh,
    sq_b,
    sq_h,
    sq_t,
    sk_b,
    sk_h,
    sk_t,
    sqo_b,
    sqo_h,
    sqo_t,
    sko_b,
    sko_h,
    sko_t,
    scos_t,
    ssin_t,
    half,
    BACKWARD: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_QH: tl.constexpr,
    BLOCK_KH: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    # One program: BLOCK_T consecutive positions of one sequence, every q and k head.
    pid = tl.program_id(0)
    t_blocks = tl.cdiv(seq_len, BLOCK_T)
    b = (pid // t_blocks).to(tl.int64)
    t = (pid % t_blocks) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = t < seq_len
    t = t.to(tl.int64)
    d = tl.arange(0, BLOCK_HALF)
    cs_mask = t_mask[:, None] & (d < half)[None, :]
    cos_ptr = COS + t[:, None] * scos_t + d[None, :]
    sin_ptr = SIN + t[:, None] * ssin_t + d[None, :]
    # cos/sin are rounded to q's dtype first, as the reference casts them before multiplying.
    c1 = tl.load(cos_ptr, mask=cs_mask, other=0.0).to(Q.dtype.element_ty).to(tl.float32)
    c2 = tl.load(cos_ptr + half, mask=cs_mask, other=0.0).to(Q.dtype.element_ty).to(tl.float32)
    s1 = tl.load(sin_ptr, mask=cs_mask, other=0.0).to(Q.dtype.element_ty).to(tl.float32)
    s2 = tl.load(sin_ptr + half, mask=cs_mask, other=0.0).to(Q.dtype.element_ty).to(tl.float32)
    if BACKWARD:
        # Transposed rotation: swap which half's sin enters which output, with flipped signs.
        s1, s2 = -s2, -s1
    _rotate_heads(Q, QO, b, t, t_mask, n_qh, sq_b, sq_h, sq_t, sqo_b, sqo_h, sqo_t,
                  c1, c2, s1, s2, half, BLOCK_QH, BLOCK_HALF)  # fmt: skip
    _rotate_heads(K, KO, b, t, t_mask, n_kh, sk_b, sk_h, sk_t, sko_b, sko_h, sko_t,
                  c1, c2, s1, s2, half, BLOCK_KH, BLOCK_HALF)  # fmt: skip


def _check_cos_sin(q: torch.Tensor, cos: torch.Tensor, name: str) -> torch.Tensor:
    """cos/sin as [T, head_dim] with unit stride in the last dim (leading 1-dims dropped)."""
    T, hd = q.shape[2], q.shape[3]
    while cos.dim() > 2 and cos.shape[0] == 1:
        cos = cos[0]
    if tuple(cos.shape) != (T, hd):
        raise ValueError(f"apply_rope: {name} must be [T, head_dim] = [{T}, {hd}], got {tuple(cos.shape)}")
    return cos if cos.stride(-1) == 1 else cos.contiguous()


def rope_launch(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [B, H, T, hd] and k [B, Hkv, T, hd] (or un-rotate gradients with backward=True)."""
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    B, n_qh, T, hd = q.shape
    n_kh = k.shape[1]
    qo = empty(q.shape, q.dtype, q.device).as_strided(q.shape, _dense_strides(q))
    ko = empty(k.shape, k.dtype, k.device).as_strided(k.shape, _dense_strides(k))
    if q.numel() == 0 and k.numel() == 0:
        return qo, ko
    half = hd // 2
    block_qh = triton.next_power_of_2(n_qh)
    block_kh = triton.next_power_of_2(n_kh)
    block_half = triton.next_power_of_2(half)
    # Several positions per program when heads are few and narrow (small models, tests).
    block_t = max(1, min(MAX_TILE // (max(block_qh, block_kh) * block_half), triton.next_power_of_2(T)))
    grid = (B * triton.cdiv(T, block_t),)
    _rope_kernel[grid](
        q, k, qo, ko, cos, sin, T, n_qh, n_kh,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        qo.stride(0), qo.stride(1), qo.stride(2), ko.stride(0), ko.stride(1), ko.stride(2),
        cos.stride(0), sin.stride(0), half,
        BACKWARD=backward, BLOCK_T=block_t, BLOCK_QH=block_qh, BLOCK_KH=block_kh, BLOCK_HALF=block_half,
        num_warps=num_warps_for(block_t * max(block_qh, block_kh) * block_half),
    )  # fmt: skip
    return qo, ko


def _dense_strides(t: torch.Tensor) -> tuple[int, ...]:
    """Strides of a dense tensor with t's dimension order (so a transposed view stays transposed).

    Keeping the projection's [B, T, H, hd] memory order means the attention that follows sees the
    same layout as with the reference ops.
    """
    order = sorted(range(t.dim()), key=lambda i: (t.stride(i), t.shape[i]), reverse=True)
    strides = [0] * t.dim()
    step = 1
    for i in reversed(order):
        strides[i] = step
        step *= t.shape[i]
    return tuple(strides)


class RopeFunction(torch.autograd.Function):
    """Autograd wrapper: saves only cos/sin; cos/sin themselves get no gradient (they are tables)."""

    @staticmethod
    def forward(
        ctx, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.save_for_backward(cos, sin)
        return rope_launch(q, k, cos, sin)

    @staticmethod
    def backward(ctx, dq: torch.Tensor, dk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, None]:
        cos, sin = ctx.saved_tensors
        dq_in, dk_in = rope_launch(dq, dk, cos, sin, backward=True)
        return dq_in, dk_in, None, None


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of q [B, H, T, hd] and k [B, Hkv, T, hd] by cos/sin [T, hd] (rotate_half).

    Same signature and numerics as the torch op; cos/sin are treated as constants.
    """
    if q.dim() != 4 or k.dim() != 4 or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"apply_rope: q {tuple(q.shape)} and k {tuple(k.shape)} must be [B, H, T, hd]")
    if q.shape[-1] % 2:
        raise ValueError(f"apply_rope: head_dim must be even, got {q.shape[-1]}")
    if q.dtype != k.dtype:
        raise ValueError(f"apply_rope: q and k dtypes differ ({q.dtype} vs {k.dtype})")
    cos = _check_cos_sin(q, cos, "cos")
    sin = _check_cos_sin(q, sin, "sin")
    return RopeFunction.apply(q, k, cos, sin)
