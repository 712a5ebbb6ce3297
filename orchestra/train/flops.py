"""Peak FLOP/s per device and model FLOPs per token, for MFU.

MFU = achieved model FLOP/s / peak FLOP/s of the device for the training dtype. A device that is
not in the table gets no MFU (and a warning) unless ``trainer.peak_flops`` says what its peak is:
a guessed peak silently produces impossible numbers (200% MFU), which is worse than none.
"""

from __future__ import annotations

import torch

from orchestra.config import ModelConfig

# Dense (no sparsity) tensor-core peaks in FLOP/s, from the vendors' data sheets.
# Keys are matched as lower-case substrings of torch.cuda.get_device_name(); longest match wins.
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "h100 sxm": {"bf16": 989e12, "fp16": 989e12, "tf32": 494.5e12, "fp32": 67e12},
    "h100 nvl": {"bf16": 835e12, "fp16": 835e12, "tf32": 417.5e12, "fp32": 60e12},
    "h100 pcie": {"bf16": 756e12, "fp16": 756e12, "tf32": 378e12, "fp32": 51e12},
    # torch reports the SXM part as "NVIDIA H100 80GB HBM3".
    "h100 80gb hbm3": {"bf16": 989e12, "fp16": 989e12, "tf32": 494.5e12, "fp32": 67e12},
    "h200": {"bf16": 989e12, "fp16": 989e12, "tf32": 494.5e12, "fp32": 67e12},
    "gh200": {"bf16": 989e12, "fp16": 989e12, "tf32": 494.5e12, "fp32": 67e12},
    "b200": {"bf16": 2250e12, "fp16": 2250e12, "tf32": 1100e12, "fp32": 80e12},
    "gb200": {"bf16": 2500e12, "fp16": 2500e12, "tf32": 1250e12, "fp32": 80e12},
    "a100": {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12},
    "a800": {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12},
    "l40s": {"bf16": 362e12, "fp16": 362e12, "tf32": 183e12, "fp32": 91.6e12},
    "l4": {"bf16": 121e12, "fp16": 121e12, "tf32": 60e12, "fp32": 30.3e12},
    "a10g": {"bf16": 70e12, "fp16": 70e12, "tf32": 35e12, "fp32": 31.2e12},
    "a10": {"bf16": 125e12, "fp16": 125e12, "tf32": 62.5e12, "fp32": 31.2e12},
    "v100": {"fp16": 125e12, "fp32": 15.7e12},
    "rtx 4090": {"bf16": 165e12, "fp16": 165e12, "tf32": 82.6e12, "fp32": 82.6e12},
    "mi300x": {"bf16": 1307e12, "fp16": 1307e12, "tf32": 653.7e12, "fp32": 163.4e12},
    "mi325x": {"bf16": 1307e12, "fp16": 1307e12, "tf32": 653.7e12, "fp32": 163.4e12},
    "mi250x": {"bf16": 383e12, "fp16": 383e12, "fp32": 95.7e12},
}


def precision_dtype(precision: str) -> str:
    """The matmul dtype a Lightning precision string trains in."""
    if precision.startswith("bf16"):
        return "bf16"
    if precision.startswith("16"):
        return "fp16"
    if torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "fp32"


def device_peak_flops(device_name: str, dtype: str) -> float | None:
    """Peak FLOP/s for a device name and dtype, or None when the table does not know it."""
    name = device_name.lower()
    matches = [key for key in PEAK_FLOPS if key in name]
    if not matches:
        return None
    return PEAK_FLOPS[max(matches, key=len)].get(dtype)


def model_flops_per_token(m: ModelConfig, vocab_size: int, seq_len: int) -> float:
    """Training FLOPs per token: 6 x matmul parameters + attention (12 x layers x dim x seq).

    The matmul parameters are every weight used in a matrix product: attention and MLP
    projections and the lm head (the input embedding is a lookup, so it is not counted).
    This is the llm-foundry / torchtitan convention, so MFU numbers compare across tools.
    """
    kv_dim = m.n_kv_heads * m.head_dim
    per_layer = m.dim * (m.dim + 2 * kv_dim) + m.dim * m.dim + 3 * m.dim * m.ffn_dim
    n_matmul = m.n_layers * per_layer + vocab_size * m.dim
    return 6.0 * n_matmul + 12.0 * m.n_layers * m.dim * seq_len
