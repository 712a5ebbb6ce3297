"""Bottleneck adapters (Houlsby et al. 2019) after every block's attention and MLP."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from orchestra.model.peft.freeze import decoder_blocks


class Adapter(nn.Module):
    """down -> GELU -> up, with ``up`` zero so the adapter adds exactly nothing at first."""

    def __init__(
        self, dim: int, bottleneck: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        if bottleneck <= 0:
            raise ValueError(f"adapter bottleneck must be a positive integer, got {bottleneck}")
        self.down = nn.Linear(dim, bottleneck, device=device, dtype=dtype)
        self.act = nn.GELU()
        self.up = nn.Linear(bottleneck, dim, device=device, dtype=dtype)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(x)))


class AdaptedModule(nn.Module):
    """Calls the wrapped sublayer unchanged and adds ``adapter(out)`` to its output.

    Wrapping (instead of editing Block.forward) keeps the model file untouched: the Block still
    adds the residual around ``attention``/``mlp``, so the result is Houlsby's
    h = x + f(x) + adapter(f(x)). Attribute lookups fall through to the wrapped module so code
    that reads e.g. ``block.attention.layer_idx`` keeps working.
    """

    def __init__(self, inner: nn.Module, dim: int, bottleneck: int) -> None:
        super().__init__()
        ref = next(inner.parameters())
        self.inner = inner
        self.adapter = Adapter(dim, bottleneck, device=ref.device, dtype=ref.dtype)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.inner(*args, **kwargs)
        return out + self.adapter(out)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("inner"), name)


def apply_adapters(model: nn.Module, bottleneck: int, freeze_base: bool = True) -> list[str]:
    """Add a residual bottleneck adapter after every block's attention and MLP; return the names.

    With ``freeze_base`` all pre-existing parameters are frozen first, so only adapters train.
    """
    blocks = decoder_blocks(model)
    if any(isinstance(m, AdaptedModule) for m in model.modules()):
        raise ValueError("the model already has adapters")
    if freeze_base:
        model.requires_grad_(False)
    cfg = getattr(model, "cfg", None)
    dim = int(cfg.dim) if cfg is not None else blocks[0].get_parameter("attention_norm.weight").shape[0]
    names: list[str] = []
    for i, block in enumerate(blocks):
        for sub in ("attention", "mlp"):
            setattr(block, sub, AdaptedModule(getattr(block, sub), dim, bottleneck))
            names.append(f"layers.{i}.{sub}.adapter")
    return names
