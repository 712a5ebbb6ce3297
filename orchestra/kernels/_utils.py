"""Launch helpers shared by the kernel files: output allocation, grid sizes, interpreter mode.

Every output buffer a kernel fills goes through :func:`empty`, so the tests can switch on
:data:`POISON` and get buffers full of NaN: an element a kernel forgets to write then fails the
comparison instead of passing by luck on zeroed memory.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

# Tests set this to True (monkeypatch) so fresh outputs start as NaN rather than whatever was there.
POISON = False


def empty(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.empty for a kernel's output; NaN-filled when :data:`POISON` is on."""
    out = torch.empty(tuple(shape), dtype=dtype, device=device)
    if POISON and out.is_floating_point():
        out.fill_(float("nan"))
    return out


def is_interpreted(fn: object) -> bool:
    """True when a ``@triton.jit`` function was built for Triton's CPU interpreter.

    Triton decides at decoration time (TRITON_INTERPRET read when the kernel module is imported),
    so this checks the function object itself rather than the environment variable now.
    """
    return type(fn).__name__ == "InterpretedFunction"


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors on a CUDA device; a small fixed count elsewhere (interpreter).

    Used to size persistent grids, e.g. the RMSNorm backward whose per-program partial weight
    gradients are summed in a second pass: a few programs per SM keep that buffer small.
    """
    if device.type == "cuda":
        return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())
    return 4


@functools.cache
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_warps_for(block: int) -> int:
    """Warps for a program that touches ``block`` elements per step (wider rows, more warps)."""
    if block >= 32768:
        return 32
    if block >= 8192:
        return 16
    if block >= 2048:
        return 8
    return 4
