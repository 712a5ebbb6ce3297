"""4-bit NormalFloat base weights (Dettmers et al. 2023, QLoRA) through torchao's NF4Tensor.

QLoRA keeps the frozen base in NF4 -- 4-bit codes of a normal-quantile codebook, one absmax per
64 weights, the absmax values themselves quantized to 8 bits -- and trains LoRA matrices in
full precision beside it. torchao's NF4Tensor holds the codes and dequantizes inside its linear
(on CPU and GPU alike); this module only swaps the decoder's linears for frozen NF4 ones and back.
"""

from __future__ import annotations

import torch
from torch import nn

# QLoRA's block sizes: an absmax per 64 weights, the absmax values double-quantized per 256.
BLOCK_SIZE = 64
SCALER_BLOCK_SIZE = 256
# Bytes per weight stored: a 4-bit code, an 8-bit absmax per block, one fp32 scale per scaler block.
NF4_BYTES = 0.5 + 1 / BLOCK_SIZE + 4 / (BLOCK_SIZE * SCALER_BLOCK_SIZE)


def _nf4():  # type: ignore[no-untyped-def]
    """torchao's NF4 module (imported on use: torchao loads its kernels at import)."""
    from torchao.quantization.quantize_.workflows.nf4 import nf4_tensor

    return nf4_tensor


def scaler_block_size(numel: int) -> int:
    """The double-quantization block: 256 (QLoRA's), or the largest power of two below it that
    divides the layer's number of absmax values (a small layer has fewer than 256)."""
    scalers = numel // BLOCK_SIZE
    size = SCALER_BLOCK_SIZE
    while size > 1 and scalers % size:
        size //= 2
    return size


class NF4Linear(nn.Linear):
    """A frozen ``nn.Linear`` whose weight is an NF4Tensor; the bias (if any) stays as it was."""

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> NF4Linear:
        w = linear.weight
        if w.numel() % BLOCK_SIZE:
            raise ValueError(
                f"NF4 quantizes blocks of {BLOCK_SIZE} weights; a {tuple(w.shape)} weight has "
                f"{w.numel()} (not a multiple of {BLOCK_SIZE})"
            )
        with torch.device("meta"):
            layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        quantized = _nf4().to_nf4(w.detach(), BLOCK_SIZE, scaler_block_size(w.numel()))
        layer.weight = nn.Parameter(quantized, requires_grad=False)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = _nf4().linear_nf4(x, self.weight)
        return out if self.bias is None else out + self.bias

    def dequantized(self) -> torch.Tensor:
        """The weight NF4 represents, in the dtype it was quantized from."""
        return self.weight.get_original_weight()  # type: ignore[attr-defined]

    def to_linear(self) -> nn.Linear:
        """A plain frozen ``nn.Linear`` with the dequantized weight (for merging and export)."""
        w = self.dequantized()
        linear = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None, device=w.device, dtype=w.dtype
        )
        with torch.no_grad():
            linear.weight.copy_(w)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear.requires_grad_(False)


def _parent(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (root.get_submodule(parent_name) if parent_name else root), child


def quantize_linears(model: nn.Module, skip: tuple[str, ...] = ("lm_head", "score")) -> list[str]:
    """Replace every ``nn.Linear`` by an :class:`NF4Linear`, except the output and task heads and
    LoRA's own matrices (which train)."""
    names = [
        name
        for name, m in model.named_modules()
        if type(m) is nn.Linear
        and name.split(".")[-1] not in skip
        and not name.split(".")[-1].startswith("lora_")
        # type(), not isinstance: an NF4Linear is already quantized
    ]
    for name in names:
        parent, child = _parent(model, name)
        linear = getattr(parent, child)
        try:
            setattr(parent, child, NF4Linear.from_linear(linear))
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None
    return names


def dequantize_linears(model: nn.Module) -> list[str]:
    """Replace every :class:`NF4Linear` by its dequantized ``nn.Linear`` (before merging LoRA)."""
    names = [name for name, m in model.named_modules() if isinstance(m, NF4Linear)]
    for name in names:
        parent, child = _parent(model, name)
        setattr(parent, child, getattr(parent, child).to_linear())
    return names
