"""The lm-head projection fused with cross-entropy, chunked over tokens.

Eager PyTorch materialises the [N, V] logits, an fp32 copy for the softmax and an [N, V]
gradient: at 16k tokens and a 128k vocabulary that is ~20 GB. Here the tokens are processed in
chunks of C rows: for each chunk the logits [C, V] are computed by a matmul into one reused
buffer, a Triton kernel turns each row into its loss and overwrites the row in place with
d loss / d logits, and two matmuls fold that into the gradients of the hidden states (rows of
the chunk) and of the weight (accumulated over chunks). All gradients are thus computed in the
forward pass; the backward only scales them by the incoming gradient, so nothing of size [N, V]
ever exists and nothing is recomputed.

Loss per kept row i (target t_i != ignore_index): lse_i - logit_{i, t_i} + z_loss * lse_i**2,
with lse the log-sum-exp of the row in fp32 (PaLM's z-loss keeps lse near 0). ``mean`` divides
the sum by the number of kept rows, as F.cross_entropy does. With every row ignored the mean
loss is NaN (0/0, same as F.cross_entropy, so it shows in the logs) but the gradients are zeros,
never NaN, so such a batch cannot poison the weights (the reference's are zeros too, except with
z-loss, where its 0/0 gives NaN gradients). Targets outside [0, V) that are not ignore_index are not
checked (F.cross_entropy raises); they give lse as the loss and no target term in the gradient.

The projection runs in the input dtype and the softmax in fp32, like the reference. Under
autocast the inputs are cast to the autocast dtype first (as F.linear would be), outside the
autograd Function, so autograd casts the gradients back to the parameters' dtype. The weight
gradient is accumulated in the compute dtype, like Liger-Kernel (a bf16 accumulator costs half
the memory of an fp32 one); the price is one rounding per chunk in bf16.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import empty, num_warps_for

# Widest vocabulary slice one program holds at a time; tests lower it to exercise the V loop.
MAX_BLOCK_V = 16384
# Elements per [rows, vocabulary slice] tile: narrow vocabularies get several rows per program.
MAX_TILE = 16384


@triton.jit
def _ce_rows_kernel(
    LOGITS,
    TARGETS,
    LOSS,
    SCALE,
    n_rows,
    stride_row,
    n_cols,
    ignore_index,
    z_loss,
    HAS_Z: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    # One program: BLOCK_R rows (1 for real vocabularies), streamed over the vocabulary in blocks.
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < n_rows
    base = LOGITS + rows.to(tl.int64)[:, None] * stride_row
    target = tl.load(TARGETS + rows, mask=row_mask, other=ignore_index)
    keep = row_mask & (target != ignore_index)
    offs = tl.arange(0, BLOCK_V)[None, :]

    # Pass 1: online max / sum-exp over each row in fp32, picking up the target logit on the way.
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_R], tl.float32)
    x_target = tl.zeros([BLOCK_R], tl.float32)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + offs
        mask = row_mask[:, None] & (cols < n_cols)
        x = tl.load(base + cols, mask=mask, other=float("-inf")).to(tl.float32)
        # Rows past n_rows see only -inf: keep their max finite so no inf - inf NaN appears.
        m_new = tl.maximum(tl.maximum(m, tl.max(x, axis=1)), -3.0e38)
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), axis=1)
        m = m_new
        x_target += tl.sum(tl.where(cols == target[:, None], x, 0.0), axis=1)
    # Padding rows (past n_rows) get lse = 0 so nothing below overflows for them.
    lse = tl.where(row_mask, m + tl.log(tl.where(row_mask, s, 1.0)), 0.0)
    loss = lse - x_target
    if HAS_Z:
        loss += z_loss * lse * lse
    tl.store(LOSS + rows, tl.where(keep, loss, 0.0), mask=row_mask)

    # Pass 2: overwrite the logits with d loss / d logits = scale * (softmax * (1 + 2 z lse) - onehot).
    if WRITE_GRAD:
        scale = tl.where(keep, tl.load(SCALE), 0.0)
        p_scale = scale
        if HAS_Z:
            p_scale = scale * (1.0 + 2.0 * z_loss * lse)
        for start in range(0, n_cols, BLOCK_V):
            cols = start + offs
            mask = row_mask[:, None] & (cols < n_cols)
            x = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
            g = tl.exp(x - lse[:, None]) * p_scale[:, None] - tl.where(
                cols == target[:, None], scale[:, None], 0.0
            )
            tl.store(base + cols, g.to(LOGITS.dtype.element_ty), mask=mask)


def ce_rows_launch(
    logits: torch.Tensor,
    targets: torch.Tensor,
    loss_rows: torch.Tensor,
    scale: torch.Tensor,
    ignore_index: int,
    z_loss: float,
    write_grad: bool,
) -> None:
    """Per-row loss of logits [C, V] into loss_rows [C] (fp32); with write_grad, logits become grads.

    ``scale`` is a one-element fp32 tensor (1/kept rows for mean) read on the device, so the mean
    needs no host synchronisation.
    """
    n_rows, n_cols = logits.shape
    if n_rows == 0:
        return
    block_v = min(triton.next_power_of_2(n_cols), MAX_BLOCK_V)
    # Narrow vocabularies (tests, tiny models) pack several rows into one program.
    block_r = max(1, min(MAX_TILE // block_v, 16, triton.next_power_of_2(n_rows)))
    _ce_rows_kernel[(triton.cdiv(n_rows, block_r),)](
        logits, targets, loss_rows, scale, n_rows, logits.stride(0), n_cols, ignore_index, z_loss,
        HAS_Z=z_loss != 0.0, WRITE_GRAD=write_grad, BLOCK_R=block_r, BLOCK_V=block_v,
        num_warps=num_warps_for(block_r * block_v),
    )  # fmt: skip


def default_chunk_size(n_tokens: int, dim: int, vocab: int) -> int:
    """Tokens per chunk: a logits chunk about twice the size of the hidden states (C * V ~ 2 N * D).

    Each chunk re-reads and re-writes the whole [V, D] weight-gradient accumulator, so fewer,
    larger chunks cost less traffic; bounding the chunk by the activations already held keeps the
    extra memory small next to eager's [N, V] logits. 256..4096 rows keep the matmuls efficient.
    Untuned: a first guess until bench/kernels.py has run on a GPU.
    """
    c = triton.next_power_of_2(max(1, triton.cdiv(2 * n_tokens * dim, max(vocab, 1))))
    return max(1, min(max(c, 256), 4096, n_tokens))


def linear_cross_entropy_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int,
    reduction: str,
    z_loss: float,
    chunk_size: int | None,
    grad_hidden_needed: bool,
    grad_weight_needed: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(loss, d loss/d hidden, d loss/d weight), gradients only where asked, chunk by chunk."""
    n_tokens, dim = hidden.shape
    vocab = weight.shape[0]
    device = hidden.device
    write_grad = grad_hidden_needed or grad_weight_needed

    kept = (targets != ignore_index).sum()
    if reduction == "mean":
        scale = 1.0 / kept.clamp(min=1).to(torch.float32)
    else:
        scale = torch.ones((), dtype=torch.float32, device=device)
    loss_rows = empty((n_tokens,), torch.float32, device)
    grad_hidden = empty((n_tokens, dim), hidden.dtype, device) if grad_hidden_needed else None
    grad_weight = torch.zeros((vocab, dim), dtype=weight.dtype, device=device) if grad_weight_needed else None

    chunk = chunk_size or default_chunk_size(n_tokens, dim, vocab)
    buffer = torch.empty((min(chunk, n_tokens), vocab), dtype=hidden.dtype, device=device)
    for start in range(0, n_tokens, chunk):
        end = min(start + chunk, n_tokens)
        h = hidden[start:end]
        logits = buffer[: end - start]
        torch.mm(h, weight.t(), out=logits)
        ce_rows_launch(
            logits, targets[start:end], loss_rows[start:end], scale, ignore_index, z_loss, write_grad
        )
        if grad_hidden is not None:
            torch.mm(logits, weight, out=grad_hidden[start:end])
        if grad_weight is not None:
            grad_weight.addmm_(logits.t(), h)

    total = loss_rows.sum()
    loss = total / kept if reduction == "mean" else total
    return loss, grad_hidden, grad_weight


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Autograd wrapper: the forward stores the gradients, the backward scales them in place.

    Scaling in place saves a [V, D] copy; a second backward through the same graph
    (retain_graph=True) is refused by autograd's saved-tensor version check instead of
    returning wrong gradients.
    """

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        ignore_index: int,
        reduction: str,
        z_loss: float,
        chunk_size: int | None,
    ) -> torch.Tensor:
        loss, grad_hidden, grad_weight = linear_cross_entropy_forward(
            hidden, weight, targets, ignore_index, reduction, z_loss, chunk_size,
            grad_hidden_needed=ctx.needs_input_grad[0], grad_weight_needed=ctx.needs_input_grad[1],
        )  # fmt: skip
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss

    @staticmethod
    def backward(
        ctx, grad_loss: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None, None, None, None]:
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden.mul_(grad_loss)
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(grad_loss)
        return grad_hidden, grad_weight, None, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    z_loss: float = 0.0,
    *,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``hidden [N, D] @ weight [V, D].T`` against targets [N], never holding [N, V].

    Same signature as the torch op plus ``chunk_size`` (tokens per chunk; default from
    :func:`default_chunk_size`). Returns an fp32 scalar.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"linear_cross_entropy: hidden {tuple(hidden.shape)} must be [N, D] and weight "
            f"{tuple(weight.shape)} [V, D]"
        )
    if targets.shape != hidden.shape[:1]:
        raise ValueError(
            f"linear_cross_entropy: targets {tuple(targets.shape)} must be [N={hidden.shape[0]}]"
        )
    if reduction not in ("mean", "sum"):
        raise ValueError(f"linear_cross_entropy: reduction must be 'mean' or 'sum', got {reduction!r}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"linear_cross_entropy: chunk_size must be >= 1, got {chunk_size}")
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    if hidden.dtype != weight.dtype:
        raise ValueError(f"linear_cross_entropy: hidden is {hidden.dtype} but weight is {weight.dtype}")
    with torch.autocast(device_type, enabled=False):
        return LinearCrossEntropyFunction.apply(
            hidden.contiguous(),
            weight,
            targets.contiguous(),
            int(ignore_index),
            reduction,
            float(z_loss),
            chunk_size,
        )
