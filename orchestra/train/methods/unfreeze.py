"""finetune=unfreeze: gradual unfreezing (ULMFiT), top block first, one more every N steps."""

from __future__ import annotations

from lightning.pytorch.callbacks import Callback

from orchestra.config import FinetuneConfig, ModelConfig, TrainConfig, require
from orchestra.train.callbacks.unfreeze import GradualUnfreezing
from orchestra.train.methods.spec import MethodSpec


def _validate(cfg: TrainConfig) -> None:
    f = cfg.finetune
    require(
        f.unfreeze_every_n_steps > 0,
        "finetune.unfreeze_every_n_steps",
        f"must be a positive integer, got {f.unfreeze_every_n_steps}",
    )
    require(
        not cfg.strategy.name.is_deepspeed,
        "strategy",
        "finetune=unfreeze needs an optimizer that skips still-frozen blocks; DeepSpeed's fused "
        "optimizer does not: use strategy=single, ddp or fsdp",
    )


def _callbacks(cfg: FinetuneConfig, model: ModelConfig) -> list[Callback]:
    return [GradualUnfreezing(model.n_layers, cfg.unfreeze_every_n_steps)]


SPEC = MethodSpec(name="unfreeze", validate=_validate, callbacks=_callbacks)
