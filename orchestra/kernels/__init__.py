"""Fused Triton kernels, imported as ``orchestra.kernels``; they depend on torch and triton only.

Each op lives in its own file (Triton kernels, autograd.Function, public function), and the
package exports those plain functions through its submodules: ``rms_norm.rms_norm``,
``rope.apply_rope``, ``swiglu.swiglu``, ``linear_cross_entropy.linear_cross_entropy`` and
``add_rms_norm.add_rms_norm`` (fused residual add + RMSNorm, inside each block).
The model builds its ops table from them (orchestra.model.ops, inside ``get_ops``), and the
PyTorch reference each one reproduces, "the torch op" in these files, is that table's torch
side (``orchestra.model.ops.torch_*``): one reference serves the model and the kernel tests.

:data:`INTERPRET` is True when the kernels were built for Triton's CPU interpreter
(``TRITON_INTERPRET=1`` set before triton was first imported): they then run on CPU tensors,
~2000x slower than eager, which is what the CPU test suite uses.
"""

from __future__ import annotations

# Submodules, not their functions, are bound here, so ``orchestra.kernels.rms_norm`` stays the
# module (its launch wrappers and constants) and is not shadowed by the function of that name.
from . import add_rms_norm, linear_cross_entropy, rms_norm, rope, swiglu
from ._utils import is_interpreted

INTERPRET: bool = is_interpreted(rms_norm._rms_norm_fwd_kernel)

__all__ = ["INTERPRET", "add_rms_norm", "linear_cross_entropy", "rms_norm", "rope", "swiglu"]
