"""Peak FLOP/s per device and model FLOPs per token, for MFU.

MFU = achieved model FLOP/s / peak FLOP/s of the device for the training dtype. A device that is
not in the table gets no MFU (and a warning) unless ``trainer.peak_flops`` says what its peak is:
a guessed peak silently produces impossible numbers (200% MFU), which is worse than none.
"""

from __future__ import annotations

import re

import torch

from orchestra.config import ModelConfig

# Dense (no sparsity) peak FLOP/s per torch device, by matmul dtype, from the vendors' data sheets.
# Data sheets often print the 2:4-sparsity figure (marked "*" or "with sparsity"); those are halved
# here. A dtype a device lacks is simply absent (V100 has no bf16; CDNA2/CDNA4 have no tf32), so a
# run in that dtype gets no MFU instead of a made-up one. Keys match whole words of the lower-cased
# torch.cuda.get_device_name() ("a100" matches "NVIDIA A100-SXM4-80GB" but not "RTX A1000"); the
# longest matching key wins ("h100 nvl" over "h100").
PEAK_FLOPS: dict[str, dict[str, float]] = {
    # --- NVIDIA Hopper ---
    # H100 SXM5 (torch: "NVIDIA H100 80GB HBM3"), H100 PCIe, H100 NVL: NVIDIA H100 Tensor Core GPU
    # data sheet, https://resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet
    # (SXM: FP16/BF16 1,979*, FP8 3,958*, TF32 989*, FP32 67 TFLOPS; * = with sparsity).
    "h100": {"bf16": 989e12, "fp16": 989e12, "fp8": 1979e12, "tf32": 494.5e12, "fp32": 67e12},
    "h100 pcie": {"bf16": 756e12, "fp16": 756e12, "fp8": 1513e12, "tf32": 378e12, "fp32": 51e12},
    "h100 nvl": {"bf16": 835e12, "fp16": 835e12, "fp8": 1670e12, "tf32": 417.5e12, "fp32": 60e12},
    # H200 SXM and H200 NVL: https://www.nvidia.com/en-us/data-center/h200/ (same SXM compute as H100).
    "h200": {"bf16": 989e12, "fp16": 989e12, "fp8": 1979e12, "tf32": 494.5e12, "fp32": 67e12},
    "h200 nvl": {"bf16": 835e12, "fp16": 835e12, "fp8": 1670e12, "tf32": 417.5e12, "fp32": 60e12},
    # GH200 Grace Hopper Superchip data sheet (Hopper GPU as H100 SXM: FP16 1,979*, FP8 3,958*).
    "gh200": {"bf16": 989e12, "fp16": 989e12, "fp8": 1979e12, "tf32": 494.5e12, "fp32": 67e12},
    # H20 (China export part): NVIDIA H20 product brief, FP16/BF16 148, FP8 296, TF32 74, FP32 44 TFLOPS.
    "h20": {"bf16": 148e12, "fp16": 148e12, "fp8": 296e12, "tf32": 74e12, "fp32": 44e12},
    # --- NVIDIA Blackwell (data sheets give sparse figures for whole systems; per GPU, dense) ---
    # HGX B100 (8 GPUs): FP16/BF16 28 PF*, FP8 56 PF*, TF32 14 PF*.
    "b100": {"bf16": 1750e12, "fp16": 1750e12, "fp8": 3500e12, "tf32": 875e12},
    # HGX B200 (8 GPUs): FP16/BF16 36 PF*, FP8 72 PF*, TF32 18 PF*, https://www.nvidia.com/en-us/data-center/hgx/
    "b200": {"bf16": 2250e12, "fp16": 2250e12, "fp8": 4500e12, "tf32": 1125e12},
    # GB200 NVL72 (72 GPUs): FP16/BF16 360 PF*, FP8 720 PF*, TF32 180 PF*,
    # https://www.nvidia.com/en-us/data-center/gb200-nvl72/
    "gb200": {"bf16": 2500e12, "fp16": 2500e12, "fp8": 5000e12, "tf32": 1250e12},
    # --- NVIDIA Ampere ---
    # A100 40/80 GB, SXM and PCIe alike: NVIDIA A100 data sheet (BF16 312, TF32 156, FP32 19.5 TFLOPS);
    # A800 data sheet: the same compute.
    "a100": {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12},
    "a800": {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12},
    # A10 data sheet: BF16 250*, TF32 125*, FP32 31.2 TFLOPS.
    "a10": {"bf16": 125e12, "fp16": 125e12, "tf32": 62.5e12, "fp32": 31.2e12},
    # A10G (AWS G5 only, no NVIDIA data sheet): 70 TFLOPS FP16/BF16 tensor as AWS and NVIDIA quote
    # it; other dtypes unpublished, so absent.
    "a10g": {"bf16": 70e12, "fp16": 70e12},
    # --- NVIDIA Ada (data-center parts), Ada architecture whitepaper and the L4/L40/L40S data sheets ---
    "l40s": {"bf16": 362e12, "fp16": 362e12, "fp8": 733e12, "tf32": 183e12, "fp32": 91.6e12},
    "l40": {"bf16": 181e12, "fp16": 181e12, "fp8": 362e12, "tf32": 90.5e12, "fp32": 90.5e12},
    "l4": {"bf16": 121e12, "fp16": 121e12, "fp8": 242e12, "tf32": 60e12, "fp32": 30.3e12},
    # --- Older / workstation parts kept for local runs ---
    # V100 data sheet: 125 TFLOPS FP16 tensor, 15.7 FP32; no bf16, no tf32.
    "v100": {"fp16": 125e12, "fp32": 15.7e12},
    # Ada whitepaper, RTX 4090: FP16/BF16 tensor with FP32 accumulate 165.2, TF32 82.6, FP32 82.6.
    "rtx 4090": {"bf16": 165e12, "fp16": 165e12, "tf32": 82.6e12, "fp32": 82.6e12},
    # --- AMD Instinct (amd.com product pages / data sheets; "fp32" is the FP32 matrix peak) ---
    # MI300X and MI325X: 304 CUs at 2.1 GHz: FP16/BF16 1,307.4, FP8 2,614.9, TF32 653.7, FP32 163.4.
    "mi300x": {"bf16": 1307e12, "fp16": 1307e12, "fp8": 2615e12, "tf32": 653.7e12, "fp32": 163.4e12},
    "mi325x": {"bf16": 1307e12, "fp16": 1307e12, "fp8": 2615e12, "tf32": 653.7e12, "fp32": 163.4e12},
    # MI300A APU: 228 CUs: FP16/BF16 980.6, FP8 1,961.2, TF32 490.3, FP32 122.6.
    "mi300a": {"bf16": 980.6e12, "fp16": 980.6e12, "fp8": 1961e12, "tf32": 490.3e12, "fp32": 122.6e12},
    # MI355X (CDNA4, no TF32): FP16/BF16 2.5 PF (2,516.6 TF), FP8 5.0 PF, FP32 157.3 TF.
    "mi355x": {"bf16": 2516.6e12, "fp16": 2516.6e12, "fp8": 5033e12, "fp32": 157.3e12},
    # MI200 series (CDNA2, no TF32). An MI250X or MI250 module holds two GCDs and torch sees each GCD
    # as one device, so the per-device peak is half the module figure: MI250X 383 TF FP16/BF16 and
    # 95.7 TF FP32 matrix per module; MI250 362.1 and 90.5; MI210 (one GCD) 181.0 and 45.3.
    "mi250x": {"bf16": 191.5e12, "fp16": 191.5e12, "fp32": 47.9e12},
    "mi250": {"bf16": 181e12, "fp16": 181e12, "fp32": 45.3e12},
    "mi210": {"bf16": 181e12, "fp16": 181e12, "fp32": 45.3e12},
}

# ROCm names both MI250X and MI250 GCDs "AMD Instinct MI250X/MI250"; their compute-unit count per
# GCD tells them apart.
_MI250_BY_COMPUTE_UNITS = {110: "mi250x", 104: "mi250"}


def precision_dtype(precision: str) -> str:
    """The matmul dtype a Lightning precision string trains in."""
    if precision.startswith("transformer-engine"):
        return "fp8"
    if precision.startswith("bf16"):
        return "bf16"
    if precision.startswith("16"):
        return "fp16"
    if torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "fp32"


def _matches(key: str, name: str) -> bool:
    return re.search(rf"(?<![a-z0-9]){re.escape(key)}(?![a-z0-9])", name) is not None


def device_peak_flops(device_name: str, dtype: str, compute_units: int | None = None) -> float | None:
    """Peak FLOP/s for a device name and dtype, or None when the table cannot say for sure.

    ``compute_units`` (torch's multi_processor_count) resolves names shared by several parts.
    """
    name = device_name.lower()
    matches = [key for key in PEAK_FLOPS if _matches(key, name)]
    if not matches:
        return None
    if "mi250x/mi250" in name:
        key = _MI250_BY_COMPUTE_UNITS.get(compute_units or 0)
        return PEAK_FLOPS[key].get(dtype) if key else None
    return PEAK_FLOPS[max(matches, key=len)].get(dtype)


def visible_pairs(seq_len: int, window: int | None = None) -> int:
    """(query, key) pairs a causal layer scores over ``seq_len`` positions.

    Query i sees keys max(0, i - window + 1) .. i, i.e. min(i + 1, window) of them (the model's
    mask, transformer.Attention._mask). Summed over i: T(T + 1)/2 with full attention (or a window
    of at least T), and w(w + 1)/2 + (T - w)w = Tw - w(w - 1)/2 for a window w < T: on average
    (T + 1)/2 and w - w(w - 1)/(2T) visible keys per query.
    """
    if window is None or window >= seq_len:
        return seq_len * (seq_len + 1) // 2
    return seq_len * window - window * (window - 1) // 2


def attention_keys(seq_len: int, window: int | None = None) -> float:
    """Keys per query the attention term counts for one layer: ``seq_len`` for full attention.

    Full causal attention is counted as the whole T x T score matrix, T keys per query, although
    its queries see (T + 1)/2 on average: the llm-foundry / torchtitan / PaLM convention (no causal
    halving), kept so that MFU compares across tools. A windowed layer is counted in the same units,
    scaled by its share of a full layer's visible pairs: T * visible_pairs(T, w) / visible_pairs(T),
    which is w(2T - w + 1)/(T + 1) for w < T (about 2w when T >> w) and exactly T once the window
    covers the sequence. Either plain rule would be wrong: ``min(T, w)`` counts a windowed layer at
    half its share (Mistral at T = 8192, w = 4096 scores 75% of a full layer's pairs, not 50%), and
    the raw average w - w(w - 1)/(2T) drops to about T/2 at w = T - 1 (Phi-3-mini's 2047 window at
    T = 2048 masks one pair, yet the term would halve).
    """
    return seq_len * visible_pairs(seq_len, window) / visible_pairs(seq_len)


def attention_flops_per_token(m: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token of attention's scores and values: 12 x n_heads x head_dim x keys per layer.

    Per (query, key) pair, QK^T and AV each take n_heads x head_dim multiply-adds, 4 x that many
    FLOPs forward and twice as many backward: 12 x the query width n_heads x head_dim (not dim when
    a family sets its own head_dim; grouped kv heads are repeated to the query heads, so those set
    the width). ``keys`` is :func:`attention_keys` of the layer's window. A frozen base leaves the
    term as it is: backward still needs dQ, dK and dV.
    """
    q_dim = m.n_heads * m.head_size
    keys = sum(
        attention_keys(seq_len, m.sliding_window if m.is_windowed(i) else None) for i in range(m.n_layers)
    )
    return 12.0 * q_dim * keys


def model_flops_per_token(
    m: ModelConfig, vocab_size: int, seq_len: int, *, weight_grads: bool = True, lm_head: bool = True
) -> float:
    """Training FLOPs per token: 6 x matmul parameters + attention (:func:`attention_flops_per_token`).

    The matmul parameters are every weight used in a matrix product: attention and MLP
    projections (q and o are n_heads x head_dim wide, k and v n_kv_heads x head_dim, which is
    not dim when a family sets its own head_dim) and the lm head (the input embedding is a
    lookup, so it is not counted). Biases (Qwen2's q/k/v), norms (q/k norms, sandwich norms),
    activations, soft-caps and RoPE are elementwise: O(width) per token against O(dim x width) for
    a projection (bias and norm weights are about 1e-4 of the matrices' in every preset), well under
    1% of the total, so they are left out, as the convention does.
    Fine-tuning changes two terms: with a frozen base (LoRA, adapters, prompt tuning) backward
    computes input gradients but no weight gradients, 4 x instead of 6 x (the small PEFT weights
    are left out); a classifier never runs the lm head (``lm_head=False``).
    """
    q_dim = m.n_heads * m.head_size
    kv_dim = m.n_kv_heads * m.head_size
    per_layer = m.dim * (q_dim + 2 * kv_dim) + q_dim * m.dim + 3 * m.dim * m.ffn_dim
    n_matmul = m.n_layers * per_layer + (vocab_size * m.dim if lm_head else 0)
    return (6.0 if weight_grads else 4.0) * n_matmul + attention_flops_per_token(m, seq_len)
