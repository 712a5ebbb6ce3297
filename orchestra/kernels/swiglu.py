"""Fused SwiGLU gate, silu(gate) * up, forward and backward.

Eager PyTorch writes silu(gate) to memory and keeps it for the backward; here the forward reads
gate and up once and writes only the product, and the backward recomputes sigmoid(gate) from the
saved inputs (which the matmuls before it produced anyway) instead of storing intermediates:

    d up   = dy * silu(g)
    d gate = dy * up * sigmoid(g) * (1 + g * (1 - sigmoid(g)))
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import empty, num_warps_for

# Elements per program; a multiple of every warp count's thread count.
BLOCK = 2048


@triton.jit
def _swiglu_fwd_kernel(G, U, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    # The reference rounds silu(g) to the input dtype before the product; so do we.
    silu = (g * tl.sigmoid(g)).to(G.dtype.element_ty).to(tl.float32)
    tl.store(Y + offs, (silu * u).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(DY, G, U, DG, DU, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    du = dy * silu
    dg = dy * u * sig * (1.0 + g * (1.0 - sig))
    tl.store(DU + offs, du.to(DU.dtype.element_ty), mask=mask)
    tl.store(DG + offs, dg.to(DG.dtype.element_ty), mask=mask)


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Launch the forward on contiguous gate/up of one shape and dtype."""
    y = empty(gate.shape, gate.dtype, gate.device)
    n = gate.numel()
    if n:
        _swiglu_fwd_kernel[(triton.cdiv(n, BLOCK),)](
            gate, up, y, n, BLOCK=BLOCK, num_warps=num_warps_for(BLOCK)
        )
    return y


def swiglu_backward(
    dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward: (d gate, d up), recomputing silu from gate."""
    dg = empty(gate.shape, gate.dtype, gate.device)
    du = empty(up.shape, up.dtype, up.device)
    n = gate.numel()
    if n:
        _swiglu_bwd_kernel[(triton.cdiv(n, BLOCK),)](
            dy, gate, up, dg, du, n, BLOCK=BLOCK, num_warps=num_warps_for(BLOCK)
        )
    return dg, du


class SwiGLUFunction(torch.autograd.Function):
    """Autograd wrapper: saves gate and up only."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        gate, up = gate.contiguous(), up.contiguous()
        ctx.save_for_backward(gate, up)
        return swiglu_forward(gate, up)

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate, up = ctx.saved_tensors
        return swiglu_backward(dy.contiguous(), gate, up)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for same-shape, same-dtype tensors; same signature as the torch op."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(
            f"swiglu: gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} {up.dtype} must match"
        )
    return SwiGLUFunction.apply(gate, up)
