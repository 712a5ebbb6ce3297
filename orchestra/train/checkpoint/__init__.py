"""Checkpoints as layers, each importing only the ones below it:

- :mod:`~orchestra.train.checkpoint.meta`: the typed, versioned :class:`CheckpointMeta` and the
  one fit check;
- :mod:`~orchestra.train.checkpoint.manifest`: the sha256 manifest of a checkpoint's files;
- :mod:`~orchestra.train.checkpoint.io`: atomic saves, weights-only loads, layouts (file, FSDP2
  DCP, DeepSpeed), consolidation into one state dict, finding the newest complete checkpoint;
- :mod:`~orchestra.train.checkpoint.load`: a runnable model from any checkpoint (it uses the
  fine-tuning code, so it is imported by path, not from this package).

Export (orchestra/train/export.py) depends on this package, never the reverse.
"""

from __future__ import annotations

from typing import Any

from orchestra.train.checkpoint.io import (
    CHECKPOINT_DIRNAME,
    AtomicCheckpointIO,
    checkpoint_step,
    consolidated_state_dict,
    find_resume_checkpoint,
    is_deepspeed_checkpoint,
    is_sharded_checkpoint,
    load_checkpoint_file,
    read_meta,
    scan_checkpoints,
)
from orchestra.train.checkpoint.manifest import verify_checkpoint, write_manifest
from orchestra.train.checkpoint.meta import META_KEY, BaseRef, CheckpointError, CheckpointMeta, PeftRecord


def __getattr__(name: str) -> Any:
    # load.py sits above the fine-tuning code, which imports this package: import it on first use.
    if name == "load_model_from_checkpoint":
        from orchestra.train.checkpoint.load import load_model_from_checkpoint

        return load_model_from_checkpoint
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CHECKPOINT_DIRNAME",
    "META_KEY",
    "AtomicCheckpointIO",
    "BaseRef",
    "CheckpointError",
    "CheckpointMeta",
    "PeftRecord",
    "checkpoint_step",
    "consolidated_state_dict",
    "find_resume_checkpoint",
    "is_deepspeed_checkpoint",
    "is_sharded_checkpoint",
    "load_checkpoint_file",
    "load_model_from_checkpoint",
    "read_meta",
    "scan_checkpoints",
    "verify_checkpoint",
    "write_manifest",
]
