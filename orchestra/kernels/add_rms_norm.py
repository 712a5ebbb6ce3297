"""Fused residual add + RMSNorm (stretch op): h = x + residual, y = rms_norm(h), one pass each way.

A pre-norm block does ``h = x + sublayer(...)`` and then normalises h for the next sublayer;
eager PyTorch writes h, reads it back for the norm and again in the backward. Here one kernel
reads x and residual, writes h and y; the backward reads dy, h and the gradient arriving at h
from the residual stream, and writes one gradient for both inputs (d x = d residual = d h).

The Triton kernels are rms_norm.py's, compiled with their residual flags (HAS_RESIDUAL in the
forward, HAS_DH in the backward), so both ops share one tested code path. The model's blocks use
it (through ``ops.add_rms_norm``) for the attention residual and the MLP's norm.

The sum is computed in fp32 and stored in x's dtype, which is torch's promotion when the
residual is no wider than x: the fp32 residual stream plus a bf16 sublayer output under autocast
gives the fp32 sum torch gives. The residual's gradient is x's, cast back by autograd.
"""

from __future__ import annotations

import torch

from .rms_norm import _rows, rms_norm_backward, rms_norm_forward


class AddRMSNormFunction(torch.autograd.Function):
    """Autograd wrapper: saves h and the per-row 1/rms."""

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        weight = weight.contiguous()
        y, rstd, h = rms_norm_forward(_rows(x), weight, eps, residual=_rows(residual))
        ctx.save_for_backward(h, weight, rstd)
        ctx.x_shape = x.shape
        return y.view(x.shape[:-1] + y.shape[-1:]), h.view(x.shape)

    @staticmethod
    def backward(
        ctx, dy: torch.Tensor, dh: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None]:
        h, weight, rstd = ctx.saved_tensors
        dx, dweight = rms_norm_backward(_rows(dy), h, weight, rstd, dh=_rows(dh))
        dx = dx.view(ctx.x_shape)
        # x and residual enter h with coefficient 1: one tensor serves both (as for torch.add).
        return dx, dx, dweight, None


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual, weight, eps), x + residual) for same-shape x and residual.

    The residual's dtype must be no wider than x's (the sum is returned in x's dtype).
    """
    if x.shape != residual.shape or torch.promote_types(x.dtype, residual.dtype) != x.dtype:
        raise ValueError(
            f"add_rms_norm: x {tuple(x.shape)} {x.dtype} and residual {tuple(residual.shape)} "
            f"{residual.dtype} must have one shape, the residual's dtype no wider than x's"
        )
    if x.shape[-1] != weight.shape[-1] or weight.dim() != 1:
        raise ValueError(f"add_rms_norm: weight {tuple(weight.shape)} does not match x {tuple(x.shape)}")
    return AddRMSNormFunction.apply(x, residual, weight, eps)
