"""The small table of ops the model goes through, so fused kernels can replace them in one place.

The model never calls a Triton kernel directly: it calls ``ops.rms_norm``, ``ops.apply_rope``,
``ops.swiglu`` and ``ops.linear_cross_entropy`` on a :class:`DeviceOps`, which hands each call to
the table for the device its tensors are on (:func:`get_ops` picks a table per device type).

The ``torch_*`` functions below are the one PyTorch reference of each op: :data:`TORCH_OPS` is
made of them, and the Triton kernels (``orchestra.kernels``) are tested against them, upcast to
float64. Their numerics follow Hugging Face's Llama so exported checkpoints give the same logits;
every training dtype (fp32, bf16, fp16) computes in fp32 where HF does, and only float64 inputs,
which the kernel tests use, keep float64 instead.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from orchestra.model.config import ConfigError, KernelBackend

logger = logging.getLogger(__name__)


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
    # (x [..., D], residual [..., D], weight [D], eps) -> (rms_norm(x + residual), x + residual)
    add_rms_norm: Callable[
        [torch.Tensor, torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]
    ]
    # (hidden [N, D], weight [V, D], targets [N], ignore_index, reduction=mean|sum, z_loss) -> scalar loss
    linear_cross_entropy: Callable[..., torch.Tensor]
    # Architecture variants this table cannot compute (see VARIANTS); DeviceOps runs those calls
    # with the torch reference instead, and says so once in the log.
    unsupported: frozenset[str] = frozenset()


VARIANTS = {
    "norm_offset": "RMSNorm with an offset gain (1 + w, Gemma)",
    "gelu_tanh": "GeGLU (gelu-tanh gate, Gemma)",
    "logit_softcap": "soft-capped output logits in the loss (Gemma 2)",
}
"""Variants of the fusable ops beyond plain Llama, by the name an Ops table lists as unsupported."""


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for every training dtype; float64 stays float64 (the kernel tests' references)."""
    return torch.promote_types(dtype, torch.float32)


def torch_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    """RMSNorm computed in fp32 and cast back before the weight, exactly as HF's LlamaRMSNorm.

    The fp32 statistics keep bf16 training stable; multiplying by the weight after the cast
    (not before) is what makes our logits match transformers bit for bit in fp32. With an
    ``offset`` (Gemma: 1) the gain is ``offset + weight`` and, as in HF's GemmaRMSNorm, it is
    applied in fp32 before the cast.
    """
    input_dtype = x.dtype
    h = x.to(_compute_dtype(input_dtype))
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if offset:
        return (h * (offset + weight.to(h.dtype))).to(input_dtype)
    return weight * h.to(input_dtype)


def torch_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual): a block's residual add and the next sublayer's norm.

    The sum is torch's own (so in the wider of the two dtypes); the norm is :func:`torch_rms_norm`.
    """
    h = x + residual
    return torch_rms_norm(h, weight, eps, offset), h


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


def torch_geglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """GeGLU gating with tanh-approximated GELU (Gemma's gelu_pytorch_tanh): gelu(gate) * up."""
    return F.gelu(gate, approximate="tanh") * up


def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """cap * tanh(x / cap): bounds scores to (-cap, cap), near-identity for |x| << cap (Gemma 2)."""
    return torch.tanh(x / cap) * cap


def torch_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    z_loss: float = 0.0,
    logit_softcap: float | None = None,
) -> torch.Tensor:
    """Mean (or sum) cross-entropy of ``hidden @ weight.T`` over targets != ignore_index.

    The reference materialises the [N, V] logits (projection in the input dtype, then fp32 for
    the softmax, like ``forward()``'s logits); a fused kernel computes the same number without
    ever holding them. With every target ignored the mean is NaN, as in F.cross_entropy.
    ``z_loss`` adds PaLM's ``z_loss * logsumexp**2`` per kept row (the fused kernel supports it;
    the model does not use it).
    """
    logits = F.linear(hidden, weight)
    logits = logits.to(_compute_dtype(logits.dtype))
    if logit_softcap is not None:  # the loss of the capped logits the model outputs (Gemma 2)
        logits = softcap(logits, logit_softcap)
    loss = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction=reduction)
    if z_loss:
        keep = targets != ignore_index
        z = (torch.logsumexp(logits, dim=-1).square() * keep).sum()
        loss = loss + z_loss * (z / keep.sum() if reduction == "mean" else z)
    return loss


TORCH_OPS = Ops(
    name="torch",
    rms_norm=torch_rms_norm,
    apply_rope=torch_apply_rope,
    swiglu=torch_swiglu,
    add_rms_norm=torch_add_rms_norm,
    linear_cross_entropy=torch_linear_cross_entropy,
)


def _triton_ops() -> tuple[Ops, bool]:
    """(the Triton table, whether those kernels run in Triton's CPU interpreter).

    The table is built here, from orchestra.kernels' public functions, because it belongs to the
    model; the import is deferred so the model imports without Triton. ImportError when this
    build has no kernels (e.g. no triton installed).
    """
    from orchestra.kernels import INTERPRET, add_rms_norm, linear_cross_entropy, rms_norm, rope, swiglu

    ops = Ops(
        name="triton",
        rms_norm=rms_norm.rms_norm,
        apply_rope=rope.apply_rope,
        swiglu=swiglu.swiglu,
        add_rms_norm=add_rms_norm.add_rms_norm,
        linear_cross_entropy=linear_cross_entropy.linear_cross_entropy,
        # Not (yet) fused: these run in torch, op by op, for the models that need them.
        unsupported=frozenset(VARIANTS),
    )
    return ops, bool(INTERPRET)


def _needs_cuda(device_type: str) -> ConfigError:
    """The error for model.kernels=triton on a device the Triton kernels cannot run on."""
    return ConfigError(
        f"model.kernels=triton: Triton kernels need a CUDA device, not {device_type!r}; use "
        f"model.kernels=torch or model.kernels=auto (or, for testing, set TRITON_INTERPRET=1 before "
        f"triton is imported to run them in Triton's slow CPU interpreter)"
    )


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
            f"model.kernels=triton: the Triton kernels (orchestra.kernels) are not available in this "
            f"build ({e}); use model.kernels=torch or model.kernels=auto"
        ) from e
    if device_type != "cuda" and not interpret:
        raise _needs_cuda(device_type)
    return ops


class DeviceOps:
    """The model's ops: each call goes to the table for the device its tensors are on.

    Ops follow the tensors, so a model built on a GPU machine and run on CPU (generation with
    device=cpu, a logits check) computes with the CPU table, and one moved to the GPU with the
    CUDA table. The choice is made per call from ``x.is_cuda`` rather than re-made when the
    module moves (an ``_apply``/``to`` override), because parameters also move without
    Module._apply (FSDP2's fully_shard assigns ``param.data``) and what matters is where an op's
    inputs are, not where the model was last sent. The test is cheap and torch.compile sees it
    as a constant: a tensor's device is part of its guards, so the branch is resolved while
    tracing and costs nothing in the compiled graph.
    """

    def __init__(self, cuda: Ops, off_cuda: Ops | None) -> None:
        # off_cuda is None for model.kernels=triton when Triton cannot run off CUDA: such calls
        # raise instead of falling back.
        self.cuda = cuda
        self.off_cuda = off_cuda
        self._reported: set[tuple[str, str]] = set()

    def covers(self, table: Ops, variant: str) -> bool:
        """Whether ``table`` computes ``variant``; if not, log once that torch computes it instead."""
        if variant not in table.unsupported:
            return True
        if (table.name, variant) not in self._reported:
            self._reported.add((table.name, variant))
            logger.info(
                "model.kernels: the %s kernels do not cover %s; that op runs in torch",
                table.name,
                VARIANTS[variant],
            )
        return False

    def table(self, x: torch.Tensor) -> Ops:
        """The table for tensors on x's device.

        A DTensor (tensor parallelism hands the norms and the loss sharded tensors) goes to the
        torch reference: DTensor decomposes its ops into collectives and local ops, which a
        Triton kernel, given the wrapper, cannot do.
        """
        if isinstance(x, DTensor):
            return TORCH_OPS
        if x.is_cuda:
            return self.cuda
        if self.off_cuda is None:
            raise _needs_cuda(x.device.type)
        return self.off_cuda

    def rms_norm(
        self, x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0
    ) -> torch.Tensor:
        table = self.table(x)
        if offset:
            # Only the torch reference computes the offset gain; covers() logs a kernel table's fallback.
            self.covers(table, "norm_offset")
            return torch_rms_norm(x, weight, eps, offset)
        return table.rms_norm(x, weight, eps)

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(rms_norm(x + residual), x + residual) in one kernel where the table has one.

        The fused kernel writes the sum in x's dtype, so it takes a residual no wider than x
        (the residual stream x in fp32 and a bf16 sublayer output under autocast, or both bf16);
        otherwise, and for offset gains, the two torch ops run.
        """
        table = self.table(x)
        if offset:
            self.covers(table, "norm_offset")
            return torch_add_rms_norm(x, residual, weight, eps, offset)
        if torch.promote_types(x.dtype, residual.dtype) != x.dtype:
            return torch_add_rms_norm(x, residual, weight, eps)
        return table.add_rms_norm(x, residual, weight, eps)

    def apply_rope(
        self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.table(q).apply_rope(q, k, cos, sin)

    def swiglu(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return self.table(gate).swiglu(gate, up)

    def geglu(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        # The torch table covers every variant, so a table that does is the reference itself.
        self.covers(self.table(gate), "gelu_tanh")
        return torch_geglu(gate, up)

    def linear_cross_entropy(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        ignore_index: int = -100,
        reduction: str = "mean",
        logit_softcap: float | None = None,
    ) -> torch.Tensor:
        table = self.table(hidden)
        if logit_softcap is not None and not self.covers(table, "logit_softcap"):
            return torch_linear_cross_entropy(
                hidden,
                weight,
                targets,
                ignore_index=ignore_index,
                reduction=reduction,
                logit_softcap=logit_softcap,
            )
        extra = {} if logit_softcap is None else {"logit_softcap": logit_softcap}
        return table.linear_cross_entropy(
            hidden, weight, targets, ignore_index=ignore_index, reduction=reduction, **extra
        )


def device_ops(backend: KernelBackend | str) -> DeviceOps:
    """Both tables for ``model.kernels``, resolved once, when the model is built.

    CUDA tensors get ``get_ops(backend, "cuda")``, tensors on any other device
    ``get_ops(backend, "cpu")``. So kernels=triton fails here when Triton can run on no device of
    this process (kernels missing from the build, or no CUDA and no interpreter), and otherwise at
    the first forward on a device it cannot run on, never falling back to torch.
    """
    if not torch.cuda.is_available():
        # No tensor can be on CUDA, and auto need not import Triton: one table serves every call.
        ops = get_ops(backend, "cpu")
        return DeviceOps(cuda=ops, off_cuda=ops)
    cuda = get_ops(backend, "cuda")
    try:
        off_cuda: Ops | None = get_ops(backend, "cpu")
    except ConfigError:  # kernels=triton without the interpreter: refused per call, off the GPU
        off_cuda = None
    return DeviceOps(cuda=cuda, off_cuda=off_cuda)
