"""The shape of a fine-tuning method (see the package docstring)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from orchestra.config import FinetuneConfig, ModelConfig, TrainConfig
from orchestra.train.checkpoint.meta import CheckpointError, CheckpointMeta, PeftRecord

# (adapter_config.json or None, tensors by the names they are saved under, "peft" or "orchestra")
PeftFiles = tuple[dict[str, Any] | None, dict[str, torch.Tensor], str]
# peft prefixes every module of the wrapped model with this (PeftModel.base_model.model).
PEFT_PREFIX = "base_model.model."


def number(x: float) -> int | float:
    """16.0 -> 16: peft's configs write integers where they can."""
    return int(x) if float(x).is_integer() else float(x)


def trainable_layout(
    meta: CheckpointMeta, source: str | Path, apply: Callable[[nn.Module, FinetuneConfig], nn.Module]
) -> dict[str, tuple[int, ...]]:
    """Name -> shape of the tensors a PEFT checkpoint's method trains, from a model on the meta device.

    This checks a PEFT checkpoint without loading its (possibly large, possibly absent) base.
    """
    from orchestra.model import Transformer

    if meta.peft is None:
        raise CheckpointError(f"checkpoint {source} is not a PEFT checkpoint")
    try:
        with torch.device("meta"):
            model = apply(Transformer(meta.model_config, meta.vocab_size), meta.peft.finetune_config())
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(
            f"checkpoint {source}: its PEFT metadata does not describe a model: {err}"
        ) from err
    return {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}


def _unchanged(model: nn.Module, cfg: FinetuneConfig) -> nn.Module:
    return model


def no_rules(cfg: TrainConfig) -> None:
    return None


def _no_callbacks(cfg: FinetuneConfig, model: ModelConfig) -> list[Callback]:
    return []


def _no_positions(cfg: FinetuneConfig) -> int:
    return 0


@dataclass(frozen=True)
class MethodSpec:
    """What one fine-tuning method is; every field has the full-weights default."""

    name: str
    # False only for pretraining from scratch (finetune=none).
    needs_base: bool = True
    # The pretrained weights stay frozen: checkpoints hold the trainable tensors plus a reference
    # to the base, DPO's reference is the base with the method switched off, FLOPs have no
    # weight-gradient term for the base, and L2-SP has nothing to pull.
    frozen_base: bool = False
    # Why the trained model cannot become a plain Llama folder; None: it can (merged for LoRA).
    unmergeable: str | None = None
    # Turn a model holding the base weights into the model to train (in place, or a wrapper).
    apply: Callable[[nn.Module, FinetuneConfig], nn.Module] = _unchanged
    # Fold the method into the weights for export and fast sampling (LoRA); None: nothing to fold.
    merge: Callable[[nn.Module], object] | None = None
    # This method's own config rules and its combinations with task and strategy.
    validate: Callable[[TrainConfig], None] = no_rules
    # Callbacks the method needs during training (gradual unfreezing), given the model's shape.
    callbacks: Callable[[FinetuneConfig, ModelConfig], list[Callback]] = _no_callbacks
    # Context positions the method takes from every row (a soft prompt's virtual tokens).
    reserved_positions: Callable[[FinetuneConfig], int] = _no_positions
    # PEFT-only export: trainable tensors -> files (peft's format where peft has the method).
    peft_files: Callable[[dict[str, torch.Tensor], ModelConfig, PeftRecord], PeftFiles] | None = None
    # The inverse: tensors read from an export folder -> trainable tensors under our names.
    read_peft_files: (
        Callable[[dict[str, torch.Tensor], CheckpointMeta, Path], dict[str, torch.Tensor]] | None
    ) = None
