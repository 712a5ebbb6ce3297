"""Fused RMSNorm: one read of x, one write of y forward; one read of x and dy backward.

Numerics follow the PyTorch reference (HF LlamaRMSNorm): statistics in fp32, the normalised row
cast back to x's dtype, then multiplied by the weight. The backward recomputes the
normalised row from x and the saved per-row 1/rms instead of storing it, and the weight
gradient is summed over rows in two passes: each program of a persistent grid accumulates a
partial sum over its rows in fp32, and the [programs, D] partials are reduced afterwards, so no
atomics and a deterministic result.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import empty, num_sms, num_warps_for

# Elements one program holds per tile: rows are batched into a tile until it reaches this size,
# so narrow rows (tests, small models) do not get one tiny program each. Tests lower it.
MAX_TILE = 4096
# Backward grid: programs per SM (each keeps one fp32 partial row of the weight gradient). Untuned.
PROGRAMS_PER_SM = 2


@triton.jit
def _rms_norm_fwd_kernel(
    X,
    R,
    H,
    W,
    Y,
    RSTD,
    n_rows,
    n_cols,
    stride_x,
    stride_r,
    stride_h,
    stride_y,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    row_mask = rows < n_rows
    col_mask = cols < n_cols
    mask = row_mask[:, None] & col_mask[None, :]
    rows64 = rows.to(tl.int64)

    x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        # Fused residual add (add_rms_norm.py): h = x + r in x's dtype, written out and normalised.
        r = tl.load(R + rows64[:, None] * stride_r + cols[None, :], mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)
        tl.store(H + rows64[:, None] * stride_h + cols[None, :], x, mask=mask)
    x = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)
    # Round the normalised row to x's dtype before the weight, as the reference does.
    xhat = (x * rstd[:, None]).to(X.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    y = xhat * w[None, :]
    tl.store(Y + rows64[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=row_mask)


@triton.jit
def _rms_norm_bwd_kernel(
    DY,
    X,
    W,
    RSTD,
    DX,
    DW_PARTIAL,
    DH,
    n_rows,
    n_cols,
    stride_dy,
    stride_x,
    stride_dx,
    stride_dh,
    HAS_DH: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    n_tiles = tl.cdiv(n_rows, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    col_mask = cols < n_cols
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_D], dtype=tl.float32)

    # Persistent grid: program p takes tiles p, p + P, p + 2P, ... and keeps one dw partial.
    for tile in range(pid, n_tiles, n_programs):
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < n_rows
        mask = row_mask[:, None] & col_mask[None, :]
        rows64 = rows.to(tl.int64)
        dy = tl.load(DY + rows64[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)

        xhat = x * rstd[:, None]
        # y = w * cast(xhat): the weight sees the rounded row, the input gradient flows through
        # the cast unchanged (as autograd treats a dtype cast).
        dw += tl.sum(dy * xhat.to(X.dtype.element_ty).to(tl.float32), axis=0)
        g = dy * w[None, :]
        # d/dx of x * rsqrt(mean(x^2) + eps) applied to g: rstd * (g - xhat * mean(g * xhat)).
        c = tl.sum(g * xhat, axis=1) / n_cols
        dx = rstd[:, None] * (g - xhat * c[:, None])
        if HAS_DH:
            # add_rms_norm: the sum h is also an output; its own gradient joins the norm's.
            dx += tl.load(DH + rows64[:, None] * stride_dh + cols[None, :], mask=mask, other=0.0).to(
                tl.float32
            )
        tl.store(DX + rows64[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)

    tl.store(DW_PARTIAL + pid.to(tl.int64) * n_cols + cols, dw, mask=col_mask)


def _blocks(n_rows: int, n_cols: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_D): a whole row per tile, several rows when rows are narrow."""
    block_d = triton.next_power_of_2(n_cols)
    block_m = max(1, min(MAX_TILE // block_d, triton.next_power_of_2(n_rows)))
    return block_m, block_d


def rms_norm_forward(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward on x [M, D] (unit stride in D): (y [M, D], rstd [M] fp32, h).

    With ``residual`` (same shape, a dtype no wider than x's) the row normalised is h = x + residual, returned as
    h; without it h is x itself.
    """
    n_rows, n_cols = x.shape
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    y = empty((n_rows, n_cols), out_dtype, x.device)
    rstd = empty((n_rows,), torch.float32, x.device)
    h = x if residual is None else empty((n_rows, n_cols), x.dtype, x.device)
    if n_rows == 0:
        return y, rstd, h
    r = x if residual is None else residual
    block_m, block_d = _blocks(n_rows, n_cols)
    grid = (triton.cdiv(n_rows, block_m),)
    _rms_norm_fwd_kernel[grid](
        x, r, h, weight, y, rstd, n_rows, n_cols, x.stride(0), r.stride(0), h.stride(0), y.stride(0), eps,
        HAS_RESIDUAL=residual is not None, BLOCK_M=block_m, BLOCK_D=block_d,
        num_warps=num_warps_for(block_m * block_d),
    )  # fmt: skip
    return y, rstd, h


def rms_norm_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    n_programs: int | None = None,
    dh: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward: (dx [M, D] in x's dtype, dweight [D] in weight's dtype).

    ``dh`` (add_rms_norm) is a gradient arriving at x from elsewhere, added into dx in the kernel.

    ``n_programs`` sizes the persistent grid (default: PROGRAMS_PER_SM per SM); the tests vary it so tiles
    split unevenly between programs.
    """
    n_rows, n_cols = x.shape
    dx = empty((n_rows, n_cols), x.dtype, x.device)
    block_m, block_d = _blocks(n_rows, n_cols)
    n_tiles = triton.cdiv(n_rows, block_m)
    n_programs = max(1, min(n_programs or PROGRAMS_PER_SM * num_sms(x.device), n_tiles))
    partial = empty((n_programs, n_cols), torch.float32, x.device)
    if n_rows == 0:
        return dx, torch.zeros_like(weight)
    extra = dy if dh is None else dh
    _rms_norm_bwd_kernel[(n_programs,)](
        dy, x, weight, rstd, dx, partial, extra, n_rows, n_cols,
        dy.stride(0), x.stride(0), dx.stride(0), extra.stride(0),
        HAS_DH=dh is not None, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=num_warps_for(block_m * block_d),
    )  # fmt: skip
    # Second pass: reduce the per-program partial sums (fp32) to the weight gradient.
    dweight = partial.sum(dim=0).to(weight.dtype)
    return dx, dweight


def _rows(t: torch.Tensor) -> torch.Tensor:
    """View [..., D] as [M, D] with unit stride along D (copying only when it must)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


class RMSNormFunction(torch.autograd.Function):
    """Autograd wrapper: saves x and the per-row 1/rms (not the normalised row)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x2 = _rows(x)
        weight = weight.contiguous()
        y, rstd, _ = rms_norm_forward(x2, weight, eps)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.x_shape = x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        x2, weight, rstd = ctx.saved_tensors
        dx, dweight = rms_norm_backward(_rows(dy), x2, weight, rstd)
        return dx.view(ctx.x_shape), dweight, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of x [..., D] with gain weight [D]; same signature and numerics as the torch op."""
    if x.shape[-1] != weight.shape[-1] or weight.dim() != 1:
        raise ValueError(f"rms_norm: weight {tuple(weight.shape)} does not match x {tuple(x.shape)}")
    return RMSNormFunction.apply(x, weight, eps)
