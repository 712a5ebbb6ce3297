"""The small table of ops the model goes through, so fused kernels can replace them in one place.

The model never calls a Triton kernel directly: it asks :func:`get_ops` once for a table and
calls ``ops.rms_norm``, ``ops.apply_rope``, ``ops.swiglu`` and ``ops.linear_cross_entropy``.
:data:`TORCH_OPS` is the plain-PyTorch reference every kernel is tested against; its numerics
follow Hugging Face's Llama so exported checkpoints give the same logits.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from orchestra.config import ConfigError, KernelBackend


@dataclass(frozen=True)
class Ops:
    """Callables the model uses for its fusable ops (one table per backend)."""

    name: str
    # (x [..., D], weight [D], eps) -> [..., D] in x's dtype
    rms_norm: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
    # (q [B, H, T, hd], k [B, Hkv, T, hd], cos [T, hd], sin [T, hd]) -> (q, k) rotated
    apply_rope: Callable[
        [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]
    ]
    # (gate, up) -> silu(gate) * up
    swiglu: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    # (hidden [N, D], weight [V, D], targets [N], ignore_index, reduction=mean|sum) -> scalar loss
    linear_cross_entropy: Callable[..., torch.Tensor]


def torch_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in fp32 and cast back before the weight, exactly as HF's LlamaRMSNorm.

    The fp32 statistics keep bf16 training stable; multiplying by the weight after the cast
    (not before) is what makes our logits match transformers bit for bit in fp32.
    """
    input_dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(input_dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] over the last dim: the non-interleaved RoPE pairing HF uses."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def torch_apply_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding with HF's rotate_half convention (dim i pairs with i + head_dim/2).

    cos/sin are [T, head_dim] and broadcast over batch and heads; they are cast to q's dtype
    first, as HF does, so bf16 runs rotate in bf16.
    """
    cos = cos.to(q.dtype)
    sin = sin.to(q.dtype)
    q_out = q * cos + _rotate_half(q) * sin
    k_out = k * cos + _rotate_half(k) * sin
    return q_out, k_out


def torch_swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU gating: silu(gate) * up."""
    return F.silu(gate) * up


def torch_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """Mean (or sum) cross-entropy of ``hidden @ weight.T`` over targets != ignore_index.

    The reference materialises the [N, V] logits (projection in the input dtype, then fp32 for
    the softmax, like ``forward()``'s logits); a fused kernel computes the same number without
    ever holding them. With every target ignored the mean is NaN, as in F.cross_entropy.
    """
    logits = F.linear(hidden, weight).float()
    return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction=reduction)


TORCH_OPS = Ops(
    name="torch",
    rms_norm=torch_rms_norm,
    apply_rope=torch_apply_rope,
    swiglu=torch_swiglu,
    linear_cross_entropy=torch_linear_cross_entropy,
)


def _triton_ops() -> tuple[Ops, bool]:
    """(orchestra.kernels.TRITON_OPS, whether those kernels run in Triton's CPU interpreter).

    ImportError when this build has no kernels (e.g. no triton installed). importlib looks the
    module up in sys.modules, so tests can stand a fake in for it.
    """
    kernels = importlib.import_module("orchestra.kernels")
    return kernels.TRITON_OPS, bool(getattr(kernels, "INTERPRET", False))


def get_ops(backend: KernelBackend | str, device_type: str) -> Ops:
    """Pick the ops table for ``model.kernels`` on a device type ("cuda", "cpu", ...).

    torch: the reference. auto: Triton on CUDA when orchestra.kernels provides it, otherwise
    torch, so the same config runs on a laptop and on a cluster. triton: Triton or a
    ConfigError, never a silent fallback, because the user asked for it explicitly. On a
    non-CUDA device ``triton`` is accepted only in interpreter mode (TRITON_INTERPRET=1 set
    before triton was first imported): the real kernel code then runs on CPU tensors through
    Triton's interpreter, ~2000x slower than eager, which is how the CPU tests exercise it.
    """
    try:
        choice = KernelBackend(backend)
    except ValueError:
        allowed = [b.value for b in KernelBackend]
        raise ConfigError(f"model.kernels: {backend!r} is not one of {allowed}") from None

    if choice == KernelBackend.torch:
        return TORCH_OPS
    if choice == KernelBackend.auto:
        if device_type != "cuda":
            return TORCH_OPS
        try:
            return _triton_ops()[0]
        except ImportError:
            return TORCH_OPS

    try:
        ops, interpret = _triton_ops()
    except ImportError as e:
        raise ConfigError(
            f"model.kernels=triton: the Triton kernels (orchestra.kernels.TRITON_OPS) are not "
            f"available in this build ({e}); use model.kernels=torch or model.kernels=auto"
        ) from e
    if device_type != "cuda" and not interpret:
        raise ConfigError(
            f"model.kernels=triton: Triton kernels need a CUDA device, but this process sees "
            f"{device_type!r}; use model.kernels=torch or model.kernels=auto (or, for testing, set "
            f"TRITON_INTERPRET=1 before triton is imported to run them in Triton's slow CPU interpreter)"
        )
    return ops
