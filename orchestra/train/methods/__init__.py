"""Fine-tuning methods: one file per method, each exporting a :class:`MethodSpec` named ``SPEC``.

Everything that differs between methods -- how the model is changed, whether the base stays
frozen, what a checkpoint holds, how it exports, which configs it refuses, which callbacks it
adds -- is a field of its spec, so the rest of Orchestra never branches on a method's name.
Adding a method is a new file here, a line in :data:`METHODS`, and its preset in conf/finetune/.
"""

from __future__ import annotations

from pathlib import Path

from orchestra.config import ConfigError, FinetuneMethod, TrainConfig
from orchestra.train.checkpoint.meta import CheckpointError
from orchestra.train.methods import adapter, dora, full, lora, none, prompt, qlora, unfreeze
from orchestra.train.methods.spec import MethodSpec

METHODS: dict[str, MethodSpec] = {
    m.SPEC.name: m.SPEC for m in (none, full, lora, dora, qlora, adapter, prompt, unfreeze)
}


def method_spec(method: str | FinetuneMethod, source: str | Path | None = None) -> MethodSpec:
    """The spec of ``finetune.method`` (a name or the enum); ``source``: the checkpoint that names it."""
    name = method.value if isinstance(method, FinetuneMethod) else str(method)
    if name not in METHODS:
        if source is not None:
            raise CheckpointError(
                f"checkpoint {source}: fine-tuning method {name!r} is not one of {', '.join(METHODS)}"
            )
        raise ConfigError(f"finetune.method: {name!r} is not one of {', '.join(METHODS)}")
    return METHODS[name]


def validate_method(cfg: TrainConfig) -> None:
    """The chosen method's own rules, including its combinations with task and strategy."""
    method_spec(cfg.finetune.method).validate(cfg)


__all__ = ["METHODS", "MethodSpec", "method_spec", "validate_method"]
