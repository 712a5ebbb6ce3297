"""LoRA (Hu et al. 2021) and DoRA (Liu et al. 2024): a frozen linear plus a trainable low-rank
update (DoRA: and a trainable per-output magnitude), merged away for export."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

ALL_LINEAR = "all-linear"
"""The ``target_modules`` value that selects every projection of the pretrained model."""


@dataclass
class LoraConfig:
    """LoRA hyper-parameters; ``target_modules`` are name suffixes or ``["all-linear"]``."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    # Weight-decomposed LoRA (peft's use_dora): a learned magnitude per output row.
    use_dora: bool = False


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update: y = Wx + (alpha/r) * B A dropout(x).

    A is Kaiming-uniform (a=sqrt(5), as the LoRA reference code and HF peft) and B is zero, so
    the wrapped layer computes exactly the base output until B has been trained. The update is
    applied as two thin matmuls, never as a dense [out, in] matrix, which is what keeps LoRA's
    activation and optimizer memory small. ``lora_A``/``lora_B`` are ``nn.Linear`` modules named
    as in peft so adapter-only weights can be exported under peft's key names.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        if rank <= 0:
            raise ValueError(f"LoRA rank must be a positive integer, got {rank}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
        self.base = base
        self.base.requires_grad_(False)
        self.rank = rank
        self.alpha = alpha
        self.scale = alpha / rank
        w = base.weight
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=w.device, dtype=w.dtype)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=w.device, dtype=w.dtype)
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # False: the layer computes its base alone (a preference task's reference, peft_disabled).
        self.enabled = True
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """A random, B zero: the product BA (the weight update) starts at exactly zero."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if not self.enabled:
            return out
        return out + self.lora_B(self.lora_A(self.dropout(x))) * self.scale

    def delta_weight(self) -> torch.Tensor:
        """The dense update scale * B @ A, computed in fp32 for an exact-as-possible merge."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scale

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """Fold the update into the base weight and return the plain ``nn.Linear`` (for export)."""
        w = self.base.weight
        w.copy_((w.float() + self.delta_weight()).to(w.dtype))
        return self.base

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}"


class DoRALinear(LoRALinear):
    """Weight-decomposed LoRA: W' = m * (W + s B A) / ||W + s B A||, the norm taken per output row.

    The magnitude m (``lora_magnitude_vector``, peft's name) starts at the base's row norms, so
    the layer starts at exactly the base output. As in the paper (section 4.3) and peft, the norm
    is treated as a constant in the backward pass (no gradient through it), which saves the
    memory of its graph. The output is computed as base(x) + (m / n - 1) * W x + (m / n) * s B A x,
    so the dense [out, in] update exists only for the norm.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__(base, rank, alpha, dropout)
        with torch.no_grad():
            norm = self.weight_norm(torch.zeros((), device=base.weight.device, dtype=base.weight.dtype))
        self.lora_magnitude_vector = nn.Parameter(norm.to(base.weight.dtype))

    def weight_norm(self, delta: torch.Tensor) -> torch.Tensor:
        """Row norms [out] of W + delta."""
        return torch.linalg.vector_norm(self.base.weight + delta, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if not self.enabled:
            return out
        w = self.base.weight
        with torch.no_grad():
            norm = self.weight_norm((self.lora_B.weight @ self.lora_A.weight) * self.scale)
        factor = self.lora_magnitude_vector / norm
        dropped = self.dropout(x)
        if isinstance(self.dropout, nn.Identity):
            plain = out if self.base.bias is None else out - self.base.bias
        else:
            plain = F.linear(dropped, w)
        return out + (factor - 1) * plain + factor * self.lora_B(self.lora_A(dropped)) * self.scale

    def delta_weight(self) -> torch.Tensor:
        """W' - W in fp32: the merged weight's difference from the base."""
        w = self.base.weight.float()
        direction = w + super().delta_weight()
        norm = torch.linalg.vector_norm(direction, dim=1, keepdim=True)
        return self.lora_magnitude_vector.float().unsqueeze(1) * direction / norm - w

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, dora"


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def _lora_targets(model: nn.Module, target_modules: str | Iterable[str]) -> list[str]:
    """Names of the ``nn.Linear`` modules LoRA should wrap; lm_head is never one of them."""
    targets = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    if not targets:
        raise ValueError(
            "LoRA target_modules is empty; name suffixes such as ['q_proj', 'v_proj'] or 'all-linear'"
        )
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("the model already has LoRA layers; merge_lora() it before applying LoRA again")
    # Projections of the pretrained model only: an adapter's own linears are new, not targets.
    linears = [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and "adapter" not in name.split(".")
    ]
    if any(t.split(".")[-1] == "lm_head" for t in targets):
        raise ValueError("LoRA cannot target lm_head: the model's loss reads lm_head.weight directly")
    if ALL_LINEAR in targets:
        if len(targets) > 1:
            raise ValueError(f"'{ALL_LINEAR}' must be the only LoRA target, got {targets}")
        return [n for n in linears if n.split(".")[-1] != "lm_head"]
    chosen = [n for n in linears if any(n == t or n.endswith("." + t) for t in targets)]
    matched = {t for t in targets if any(n == t or n.endswith("." + t) for n in chosen)}
    missing = [t for t in targets if t not in matched]
    if missing:
        suffixes = sorted({n.split(".")[-1] for n in linears if n.split(".")[-1] != "lm_head"})
        raise ValueError(
            f"LoRA target_modules {missing} match no nn.Linear; available: {suffixes} or '{ALL_LINEAR}'"
        )
    return chosen


def apply_lora(model: nn.Module, cfg: LoraConfig, freeze_base: bool = True) -> list[str]:
    """Wrap the targeted linears in :class:`LoRALinear` (:class:`DoRALinear` with ``use_dora``) in
    place and return their names.

    With ``freeze_base`` every pre-existing parameter is frozen first, so only the LoRA matrices
    train (set ``requires_grad`` on others afterwards to also train, say, the norms).
    """
    names = _lora_targets(model, cfg.target_modules)
    if freeze_base:
        model.requires_grad_(False)
    for name in names:
        base = model.get_submodule(name)
        assert isinstance(base, nn.Linear)
        layer = DoRALinear if cfg.use_dora else LoRALinear
        _set_submodule(model, name, layer(base, cfg.rank, cfg.alpha, cfg.dropout))
    return names


def merge_lora(model: nn.Module) -> list[str]:
    """Replace every :class:`LoRALinear` by its merged ``nn.Linear``; return the merged names.

    Afterwards the state dict has the original key names again (``...q_proj.weight``), which is
    what hf.py's export mapping expects. The merged weights stay frozen.
    """
    names = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    for name in names:
        lora = model.get_submodule(name)
        assert isinstance(lora, LoRALinear)
        _set_submodule(model, name, lora.merge())
    return names
