"""finetune=none: pretraining from scratch; there is no base to adapt."""

from __future__ import annotations

from orchestra.config import TrainConfig, base_path, require
from orchestra.train.methods.spec import MethodSpec


def _validate(cfg: TrainConfig) -> None:
    init_from = base_path(cfg)
    require(
        not init_from,
        "finetune.init_from" if cfg.finetune.init_from else "model.path",
        f"{init_from!r} is set but finetune.method is none (pretraining from scratch); "
        "choose finetune=full (or lora, adapter, prompt, unfreeze, l2sp) to start from it",
    )


SPEC = MethodSpec(name="none", needs_base=False, validate=_validate)
