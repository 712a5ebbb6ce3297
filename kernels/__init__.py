"""Fused Triton kernels, imported as ``orchestra.kernels``.

Each op lives in its own file (reference, Triton kernels, autograd.Function, public function).
The model reaches them only through ``orchestra.model.ops``.
"""
