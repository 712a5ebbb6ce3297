"""Fused Triton kernels, imported as ``orchestra.kernels``.

Each op lives in its own file (reference, Triton kernels, autograd.Function, public function):
rms_norm, rope, swiglu and linear_cross_entropy fill the model's ops table; add_rms_norm (fused
residual add + RMSNorm) is available but not in the table yet.
The model reaches them only through ``orchestra.model.ops``, which imports this package inside
``get_ops`` (never at module import time), so there is no import cycle.

:data:`INTERPRET` is True when the kernels were built for Triton's CPU interpreter
(``TRITON_INTERPRET=1`` set before triton was first imported): they then run on CPU tensors,
~2000x slower than eager, which is what the CPU test suite uses.
"""

from __future__ import annotations

from orchestra.model.ops import Ops

# Submodules, not their functions, are bound here, so ``orchestra.kernels.rms_norm`` stays the
# module (its launch wrappers and constants) and is not shadowed by the function of that name.
from . import add_rms_norm, linear_cross_entropy, rms_norm, rope, swiglu
from ._utils import is_interpreted

TRITON_OPS = Ops(
    name="triton",
    rms_norm=rms_norm.rms_norm,
    apply_rope=rope.apply_rope,
    swiglu=swiglu.swiglu,
    linear_cross_entropy=linear_cross_entropy.linear_cross_entropy,
)

INTERPRET: bool = is_interpreted(rms_norm._rms_norm_fwd_kernel)

__all__ = ["INTERPRET", "TRITON_OPS", "add_rms_norm", "linear_cross_entropy", "rms_norm", "rope", "swiglu"]
