"""Checkpoint files: atomic writes, safe loads, finding the newest complete checkpoint, and
consolidating any layout (a file, an FSDP2 DCP directory, a DeepSpeed ZeRO directory) into one
state dict.

Lightning's ModelCheckpoint decides *when* to save; this module decides *how* a file reaches the
disk. A save writes ``<name>.tmp-<pid>``, fsyncs it and renames it over the final name, so a
process killed mid-save leaves the previous checkpoint intact and never a torn file with a valid
name. Loading uses ``weights_only=True``: a checkpoint is data, never code.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from orchestra.config import ModelConfig
from orchestra.io import TMP_MARK, atomic_torch_save, atomic_write_text
from orchestra.train.checkpoint.manifest import (
    manifest_path,
    remove_manifest,
    verify_checkpoint,
    write_manifest,
)
from orchestra.train.checkpoint.meta import META_KEY, CheckpointError, CheckpointMeta, check_tensors

CHECKPOINT_DIRNAME = "checkpoints"


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


def deepspeed_world_size(path: Path) -> int:
    """Data-parallel ranks a ZeRO checkpoint was written by: one optimizer-state partition each."""
    tag = (path / "latest").read_text().strip()
    return len(list((path / tag).glob("*_optim_states.pt")))


def check_deepspeed_world_size(path: Path, strategy: str, world_size: int) -> None:
    """A ZeRO checkpoint resumes only under DeepSpeed at the world size that wrote it; else one clear error.

    ZeRO partitions the optimizer state (and under ZeRO-3 the weights) into one file per rank,
    and DeepSpeed's engine reads them back only at that number of ranks. Its universal checkpoint
    format would lift that, but it needs a conversion pass and its own loader flag that
    Lightning's DeepSpeedStrategy does not pass, so the way to another world size is the
    conversion this project owns: orchestra-export (weights, through DeepSpeed's zero_to_fp32),
    then a new run from those weights.
    """
    saved = deepspeed_world_size(path)
    is_zero = strategy.startswith("deepspeed")
    if is_zero and saved in (0, world_size):
        return
    convert = (
        f"`orchestra-export ckpt={path} out=<folder>` converts its weights into a Hugging Face folder a "
        "new run starts from at any world size and strategy (finetune=full finetune.init_from=<folder>; "
        "the optimizer state and the step count start afresh); nothing was changed"
    )
    if not is_zero:
        raise CheckpointError(
            f"resume: {path} is a DeepSpeed ZeRO checkpoint, which only strategy=deepspeed_zero* resumes "
            f"(this run: strategy={strategy}); {convert}"
        )
    raise CheckpointError(
        f"resume: {path} was written by {saved} data-parallel ranks and this run has {world_size}; ZeRO's "
        f"partitioned optimizer state loads only at the world size that wrote it. Resume with trainer.devices "
        f"x trainer.num_nodes = {saved}, or: {convert}"
    )


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
        # Memory-mapped: resume reads a checkpoint's metadata and shapes more than once before
        # Lightning loads it, and none of that should read the tensors themselves.
        try:
            ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):  # only the pre-zip format cannot be mapped
                raise
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for truncated / foreign files
        raise CheckpointError(
            f"checkpoint {path} could not be read as a weights-only torch checkpoint: {err}"
        ) from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "global_step" not in ckpt:
        raise CheckpointError(f"checkpoint {path} holds no 'state_dict': not an Orchestra checkpoint")
    return ckpt


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning CheckpointIO plugin: temp-then-rename saves + a sha256 manifest, weights-only loads."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        path = Path(path)
        # The old manifest must never vouch for the new bytes; if the save fails, the old file
        # stays as it was and gets its manifest back.
        previous = manifest_path(path).read_text() if manifest_path(path).is_file() else None
        try:
            remove_manifest(path)
            atomic_torch_save(checkpoint, path)
        except OSError as err:  # disk full, read-only run dir: the previous file is untouched
            if previous is not None:
                with contextlib.suppress(OSError):
                    atomic_write_text(manifest_path(path), previous)
            raise CheckpointError(
                f"could not save checkpoint {path}: {err.strerror or err} (the previous checkpoints are intact)"
            ) from err
        try:
            write_manifest(path)
        except OSError as err:  # the checkpoint is complete (fsynced, renamed); only its manifest is not
            raise CheckpointError(
                f"saved checkpoint {path} but could not write its manifest: {err.strerror or err} "
                "(the checkpoint is complete and is read unverified)"
            ) from err

    def remove_checkpoint(self, path: _PATH) -> None:
        super().remove_checkpoint(path)
        remove_manifest(Path(path))

    def load_checkpoint(
        self, path: _PATH, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        return load_checkpoint_file(path, map_location=map_location or "cpu")


def checkpoint_step(path: Path) -> int:
    """Global step stored in a checkpoint (read lazily through mmap, so it is cheap)."""
    if path.is_dir():
        return int(load_checkpoint_file(path)["global_step"])
    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return int(ckpt["global_step"])


@dataclass(frozen=True)
class CheckpointScan:
    """The outcome of looking for a checkpoint to resume from: the one taken and the ones passed over."""

    best: Path | None
    skipped: tuple[tuple[Path, str], ...]


def _candidates(ckpt_dir: Path) -> list[Path]:
    return sorted(p for p in ckpt_dir.glob("*.ckpt") if TMP_MARK not in p.name)


def scan_checkpoints(run_dir: str | Path, hashes: bool = True) -> CheckpointScan:
    """The newest complete, intact checkpoint of a run dir, and every newer one skipped with its reason.

    Temp files are never candidates. last.ckpt and the step files are compared by the global
    step they hold, because a kill between writing a step file and refreshing last.ckpt leaves
    last.ckpt one interval behind. Candidates are tried newest first; one that cannot be read or
    whose files disagree with its manifest is skipped (and named), the next older one is tried.
    Only the checkpoint taken is hashed in full (with ``hashes=False`` its sizes are checked only).
    """
    ckpt_dir = Path(run_dir) / CHECKPOINT_DIRNAME
    if not ckpt_dir.is_dir():
        return CheckpointScan(None, ())
    skipped: list[tuple[Path, str]] = []
    ranked: list[tuple[int, int, Path]] = []
    for path in _candidates(ckpt_dir):
        try:
            ranked.append((checkpoint_step(path), 0 if path.name == "last.ckpt" else 1, path))
        except Exception as err:  # torch raises several types for truncated / foreign files
            reason = f"unreadable ({_short(err)})"
            try:  # a manifest says more precisely what happened to the file
                verify_checkpoint(path, hashes=False)
            except CheckpointError as mismatch:
                reason = _short(mismatch)
            skipped.append((path, reason))
    # Newest first; at the same step a step file before last.ckpt (they are identical then).
    for _, _, path in sorted(ranked, key=lambda r: (r[0], r[1]), reverse=True):
        try:
            verify_checkpoint(path, hashes=hashes)
            if hashes:  # a complete file of the right name is not yet a checkpoint of ours
                read_meta(path)
        except CheckpointError as err:
            skipped.append((path, _short(err)))
            continue
        return CheckpointScan(path, tuple(skipped))
    return CheckpointScan(None, tuple(skipped))


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:300] if text else type(err).__name__


def find_resume_checkpoint(run_dir: str | Path, hashes: bool = True) -> Path | None:
    """Newest complete, intact checkpoint of a run dir, or None (see :func:`scan_checkpoints`)."""
    return scan_checkpoints(run_dir, hashes).best


# Lightning saves the LightningModule's state: our model's tensors under "model.".
PREFIX = "model."


def _strip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our parameter names, whether saved from the LightningModule (model.*) or the bare model."""
    if any(k.startswith(PREFIX) for k in state):
        return {k[len(PREFIX) :]: v for k, v in state.items() if k.startswith(PREFIX)}
    return dict(state)


def model_layout(cfg: ModelConfig, vocab_size: int) -> dict[str, torch.Size]:
    """Name -> shape of every tensor of the decoder a config describes (built on the meta device)."""
    from orchestra.model import Transformer

    with torch.device("meta"):
        model = Transformer(cfg, vocab_size)
    return {k: v.shape for k, v in model.state_dict().items()}


def read_meta(path: str | Path) -> CheckpointMeta:
    """The typed metadata of any checkpoint layout, without reading its tensors."""
    path = Path(path)
    return CheckpointMeta.from_dict(load_checkpoint_file(path).get(META_KEY), path)


def consolidated_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], CheckpointMeta]:
    """(full fp32 state dict with our names, its metadata) from any kind of checkpoint.

    Consolidating is reading: a DeepSpeed ZeRO directory goes through DeepSpeed's own fp32
    consolidation, an FSDP2 directory through torch.distributed.checkpoint without a process
    group, a file as is.
    """
    path = Path(path)
    verify_checkpoint(path)  # a manifest that disagrees with the files stops here, naming the file
    ckpt = load_checkpoint_file(path)  # a sharded or DeepSpeed dir yields its metadata only
    meta = CheckpointMeta.from_dict(ckpt.get(META_KEY), path)
    if is_deepspeed_checkpoint(path):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return _strip(get_fp32_state_dict_from_zero_checkpoint(str(path))), meta
    if not is_sharded_checkpoint(path):
        return _strip(ckpt["state_dict"]), meta

    import torch.distributed.checkpoint as dcp

    if meta.peft is not None:
        # Only the trainable tensors were saved: take their names and shapes from the DCP metadata.
        stored = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
        templates = {
            k[len("state_dict.") :]: torch.empty(tuple(m.size))
            for k, m in stored.items()
            if k.startswith("state_dict.") and hasattr(m, "size")
        }
    else:
        shapes = model_layout(meta.model_config, meta.vocab_size)
        templates = {PREFIX + k: torch.empty(shape) for k, shape in shapes.items()}
    state = {"state_dict": templates}
    try:
        dcp.load(state, checkpoint_id=str(path), no_dist=True)
    except Exception as err:  # a shape or key mismatch surfaces as a planner error
        raise CheckpointError(
            f"sharded checkpoint {path} does not match its recorded model config: {err}"
        ) from err
    return _strip(state["state_dict"]), meta


def check_resume_tensors(path: Path, cfg: ModelConfig, vocab_size: int) -> None:
    """A full-weight language-model file checkpoint holds this model's tensors, checked before any
    Lightning object exists (memory-mapped by load_checkpoint_file: only the index is read)."""
    if not path.is_file():
        return  # sharded and DeepSpeed directories: their strategy's loader checks them
    check_shapes(_strip(load_checkpoint_file(path)["state_dict"]), cfg, vocab_size, path)


def check_shapes(state: dict[str, torch.Tensor], cfg: ModelConfig, vocab_size: int, source: Path) -> None:
    """A full-weight state dict against the model config recorded beside it."""
    check_tensors(
        state,
        model_layout(cfg, vocab_size),
        source,
        f"the model config recorded in it (dim={cfg.dim}, n_layers={cfg.n_layers}, ...)",
    )
