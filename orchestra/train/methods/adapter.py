"""finetune=adapter: Houlsby bottleneck adapters after attention and after the MLP of each block.

peft has no such adapter, so a PEFT-only export keeps our own tensor names and only Orchestra
reads it back; there is nothing to fold into a plain Llama folder.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from orchestra.config import FinetuneConfig, ModelConfig, TrainConfig, require
from orchestra.model.peft import apply_adapters
from orchestra.train.checkpoint.meta import CheckpointMeta, PeftRecord
from orchestra.train.methods.spec import MethodSpec, PeftFiles


def _validate(cfg: TrainConfig) -> None:
    f = cfg.finetune
    require(
        f.adapter_bottleneck > 0,
        "finetune.adapter_bottleneck",
        f"must be a positive integer, got {f.adapter_bottleneck}",
    )


def _apply(model: nn.Module, cfg: FinetuneConfig) -> nn.Module:
    apply_adapters(model, cfg.adapter_bottleneck)
    return model


def _peft_files(trainable: dict[str, torch.Tensor], cfg: ModelConfig, peft: PeftRecord) -> PeftFiles:
    return None, trainable, "orchestra"


def _read_peft_files(
    tensors: dict[str, torch.Tensor], meta: CheckpointMeta, folder: Path
) -> dict[str, torch.Tensor]:
    return dict(tensors)


SPEC = MethodSpec(
    name="adapter",
    frozen_base=True,
    unmergeable="adapters add layers a Llama folder has no place for",
    apply=_apply,
    validate=_validate,
    peft_files=_peft_files,
    read_peft_files=_read_peft_files,
)
