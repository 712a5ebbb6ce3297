"""Checkpoint files: atomic writes, safe loads, and finding the newest complete checkpoint.

Lightning's ModelCheckpoint decides *when* to save; this module decides *how* a file reaches the
disk. A save writes ``<name>.tmp-<pid>``, fsyncs it and renames it over the final name, so a
process killed mid-save leaves the previous checkpoint intact and never a torn file with a valid
name. Loading uses ``weights_only=True``: a checkpoint is data, never code.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from orchestra.io import TMP_MARK, atomic_torch_save

CHECKPOINT_DIRNAME = "checkpoints"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file."""


SHARDED_META = "meta.pt"  # Lightning's name for the non-tensor part of a distributed checkpoint


def is_sharded_checkpoint(path: Path) -> bool:
    """A torch.distributed.checkpoint directory (FSDP2) written by Lightning."""
    return path.is_dir() and (path / SHARDED_META).is_file() and (path / ".metadata").is_file()


def is_deepspeed_checkpoint(path: Path) -> bool:
    """A DeepSpeed ZeRO checkpoint directory (its ``latest`` file names the tag)."""
    return path.is_dir() and (path / "latest").is_file()


def _deepspeed_client_state(path: Path) -> dict[str, Any]:
    """What Lightning (or our test) passed as client_state: step, loops, Orchestra's entry."""
    tag = (path / "latest").read_text().strip()
    # ZeRO 1/2 write mp_rank_00_model_states.pt; ZeRO-3 one zero_pp_rank_<r>_mp_rank_00_model_states.pt per rank.
    files = sorted((path / tag).glob("*mp_rank_*_model_states.pt"))
    if not files:
        raise CheckpointError(f"DeepSpeed checkpoint {path}: no model states under tag {tag!r}")
    try:
        states = torch.load(files[0], map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(
            f"DeepSpeed checkpoint {files[0]} is unreadable as weights-only data: {err}"
        ) from err
    states.pop("module", None)
    states.pop("optimizer", None)
    return states


def load_checkpoint_file(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; any failure names the file.

    For a sharded (FSDP2) or DeepSpeed directory this is its metadata only: step, loops,
    callbacks and Orchestra's own entry; the tensors stay in the shards.
    """
    path = Path(path)
    if is_deepspeed_checkpoint(path):
        return _deepspeed_client_state(path)
    if is_sharded_checkpoint(path):
        try:
            return torch.load(path / SHARDED_META, map_location="cpu", weights_only=True)
        except Exception as err:
            raise CheckpointError(
                f"sharded checkpoint {path}: metadata {SHARDED_META} unreadable: {err}"
            ) from err
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {path} does not exist (or is neither a file nor a sharded checkpoint directory)"
        )
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for truncated / foreign files
        raise CheckpointError(
            f"checkpoint {path} could not be read as a weights-only torch checkpoint: {err}"
        ) from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "global_step" not in ckpt:
        raise CheckpointError(f"checkpoint {path} holds no 'state_dict': not an Orchestra checkpoint")
    return ckpt


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning CheckpointIO plugin: temp-then-rename saves, weights-only loads."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        atomic_torch_save(checkpoint, Path(path))

    def load_checkpoint(
        self, path: _PATH, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        return load_checkpoint_file(path, map_location=map_location or "cpu")


_STEP_FILE = re.compile(r"^step=?(\d+)\.ckpt$")


def checkpoint_step(path: Path) -> int:
    """Global step stored in a checkpoint (read lazily through mmap, so it is cheap)."""
    if path.is_dir():
        return int(load_checkpoint_file(path)["global_step"])
    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return int(ckpt["global_step"])


def find_resume_checkpoint(run_dir: str | Path) -> Path | None:
    """Newest complete checkpoint of a run dir, or None.

    Temp files are never candidates. last.ckpt and the step files are compared by the global
    step they hold, because a kill between writing a step file and refreshing last.ckpt leaves
    last.ckpt one interval behind. Unreadable files are skipped: they are not complete.
    """
    ckpt_dir = Path(run_dir) / CHECKPOINT_DIRNAME
    if not ckpt_dir.is_dir():
        return None
    best: tuple[int, int, Path] | None = None
    for path in ckpt_dir.glob("*.ckpt"):
        if TMP_MARK in path.name:
            continue
        try:
            step = checkpoint_step(path)
        except Exception:
            continue
        # Prefer a step file over last.ckpt at the same step (both are identical then).
        rank = (step, 0 if path.name == "last.ckpt" else 1, path)
        if best is None or rank[:2] > best[:2]:
            best = rank
    return None if best is None else best[2]


def load_model_from_checkpoint(
    path: str | Path, map_location: Any = "cpu"
) -> tuple[Any, Any, dict[str, Any]]:
    """(model in eval mode, HF tokenizers.Tokenizer, orchestra metadata) from a training checkpoint.

    The model is a Transformer, or for a prompt-tuning checkpoint a PromptTunedModel around one
    (use orchestra.model.generate.context_length for the room left to real tokens). A PEFT
    checkpoint (its metadata has "peft") holds only the trainable tensors: the base it records
    is loaded and checked against its sha256 (see :func:`_load_peft_model`).
    """
    from tokenizers import Tokenizer

    from orchestra.config import ConfigError, model_config_from_dict
    from orchestra.model import Transformer
    from orchestra.train.export import consolidated_state_dict

    path = Path(path)
    # Any layout: a file, a sharded (FSDP2) directory or a DeepSpeed directory, names stripped.
    state, meta = consolidated_state_dict(path)
    if meta.get("task") == "classification":
        raise CheckpointError(
            f"checkpoint {path} is a sequence classifier (task=classification): it has "
            "no language-model head to generate with"
        )
    if not meta.get("tokenizer_json"):
        raise CheckpointError(f"checkpoint {path} has no tokenizer")
    try:
        model_cfg = model_config_from_dict(meta["model_config"])
    except ConfigError as err:
        raise CheckpointError(f"checkpoint {path}: {err}") from err
    if "peft" in meta:
        model = _load_peft_model(state, meta, path)
    else:
        model = Transformer(model_cfg, int(meta["vocab_size"]))
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise CheckpointError(f"checkpoint {path} does not match its own model config: {err}") from err
    tokenizer = Tokenizer.from_str(meta["tokenizer_json"])
    return model.eval(), tokenizer, meta


def _load_peft_model(trainable: dict[str, Any], meta: dict[str, Any], path: Path) -> Any:
    """Base + trainable tensors of a PEFT checkpoint, in the form that runs fastest.

    LoRA is merged into the base weights, so sampling costs what the base model's does; adapters
    stay attached (they are extra layers with nothing to fold into); a prompt-tuned model stays a
    PromptTunedModel, whose forward takes a KV cache like the Transformer's.
    """
    from orchestra.model.peft import merge_lora
    from orchestra.train.finetune import rebuild_peft_model

    peft = meta["peft"]
    if not isinstance(peft, dict) or not {"method", "config", "base"} <= peft.keys():
        raise CheckpointError(f"checkpoint {path}: its 'peft' metadata lacks method/config/base: {peft!r}")
    base = Path(str(peft["base"].get("path", "")))
    if not base.exists():
        raise CheckpointError(
            f"checkpoint {path} holds only the {peft['method']} weights of a fine-tune; its base model {base} "
            "does not exist (put the base back at that path: it is checked against the sha256 recorded at training)"
        )
    try:
        model = rebuild_peft_model(trainable, meta, path)
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError) as err:  # a malformed config or tensor shape
        raise CheckpointError(f"checkpoint {path}: cannot rebuild its {peft['method']} model: {err}") from err
    if peft["method"] == "lora":
        merge_lora(model)
    return model
