"""Helpers for the kernel tests: device choice and float64 comparisons.

Importing this skips the importing test module where the kernels cannot run: no triton, or no
CUDA and Triton not in interpreter mode (tests/conftest.py sets TRITON_INTERPRET=1 before triton
is imported on machines without an NVIDIA driver, so the CPU suite runs the real kernel code).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import orchestra.kernels as K  # after the importorskip above

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

if DEVICE == "cpu" and not K.INTERPRET:
    pytest.skip("no CUDA and Triton is not in interpreter mode (TRITON_INTERPRET=1)", allow_module_level=True)

# (rtol, atol as a fraction of the reference's largest magnitude) against float64, per input dtype.
TOLERANCE = {torch.float32: (1e-4, 1e-5), torch.bfloat16: (3e-2, 2e-2), torch.float16: (5e-3, 5e-3)}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, name: str = "") -> None:
    """Compare a kernel result with its float64 reference at the tolerance of ``dtype``.

    atol scales with the reference's largest magnitude, so tiny- and huge-valued inputs are judged
    alike; a NaN in ``actual`` (an element left unwritten in a poisoned buffer) always fails.
    """
    rtol, atol = TOLERANCE[dtype]
    scale = expected.detach().abs().max().item() if expected.numel() else 1.0
    torch.testing.assert_close(
        actual.detach().double().cpu(),
        expected.detach().double().cpu(),
        rtol=rtol,
        atol=atol * max(scale, 1e-30),
        msg=lambda m: f"{name}: {m}",
    )


def leaf(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A fresh leaf on the test device (optionally cast) that requires grad."""
    return t.detach().to(DEVICE, dtype or t.dtype).clone().requires_grad_(True)


def leaf64(t: torch.Tensor) -> torch.Tensor:
    """t's exact values upcast to float64 on the CPU, as a leaf for the reference."""
    return t.detach().cpu().double().requires_grad_(True)
