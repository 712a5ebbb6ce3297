"""Checkpoint integrity: a manifest of every file's size and sha256, written once the files are final.

An atomic rename guarantees that a checkpoint's name never points at a half-written file, but not
that the bytes stay what was written: a copy cut short, a bad disk block, a file edited by hand,
a shard of a directory replaced by another run's. The manifest catches those before a resume,
``orchestra-generate`` or ``orchestra-export`` reads the tensors.

Layouts:

- a file checkpoint ``step0000100.ckpt`` gets ``step0000100.ckpt.sha256.json`` beside it, written
  right after the file is renamed into place (a kill in between leaves a complete checkpoint
  without a manifest: *unverified*, still loadable);
- a directory checkpoint (FSDP2 DCP, DeepSpeed) gets ``MANIFEST.sha256.json`` inside it, written
  by rank zero after every rank has written its shards and before the directory is renamed into
  place, so a directory with its final name always has one.

A checkpoint without a manifest (written by an older version, or by hand) is accepted as
unverified; a manifest that disagrees with the files is a :class:`CheckpointError` naming the
file and what differs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Any

from orchestra.io import TMP_MARK, atomic_write_text
from orchestra.train.checkpoint.meta import CheckpointError

MANIFEST_FORMAT = 1
FILE_SUFFIX = ".sha256.json"  # beside a file checkpoint
DIR_MANIFEST = "MANIFEST.sha256.json"  # inside a directory checkpoint
_CHUNK = 8 << 20


def manifest_path(checkpoint: str | Path) -> Path:
    """Where the manifest of ``checkpoint`` lives (inside a directory, beside a file)."""
    checkpoint = Path(checkpoint)
    if checkpoint.is_dir():
        return checkpoint / DIR_MANIFEST
    return checkpoint.with_name(checkpoint.name + FILE_SUFFIX)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _members(checkpoint: Path) -> dict[str, Path]:
    """The files a checkpoint consists of, by the name the manifest records them under."""
    if not checkpoint.is_dir():
        return {".": checkpoint}
    return {
        str(p.relative_to(checkpoint)): p
        for p in sorted(checkpoint.rglob("*"))
        if p.is_file() and p.name != DIR_MANIFEST and TMP_MARK not in p.name
    }


def compute_manifest(checkpoint: str | Path) -> dict[str, Any]:
    files = {
        name: {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
        for name, path in _members(Path(checkpoint)).items()
    }
    return {"format": MANIFEST_FORMAT, "files": files}


def write_manifest(checkpoint: str | Path) -> Path:
    """Hash ``checkpoint``'s files and write the manifest atomically."""
    path = manifest_path(checkpoint)
    text = json.dumps(compute_manifest(checkpoint), indent=1, sort_keys=True) + "\n"
    atomic_write_text(path, text, durable=True)
    return path


def copy_manifest(source: str | Path, target: str | Path) -> None:
    """Give ``target`` (a hard link or copy of ``source``) the manifest of ``source``, if it has one."""
    src = manifest_path(source)
    if src.is_file():
        atomic_write_text(manifest_path(target), src.read_text(), durable=True)
    else:
        remove_manifest(target)


def remove_manifest(checkpoint: str | Path) -> None:
    """Delete the manifest beside a file checkpoint (a directory's goes with the directory)."""
    checkpoint = Path(checkpoint)
    with contextlib.suppress(FileNotFoundError):
        checkpoint.with_name(checkpoint.name + FILE_SUFFIX).unlink()


def read_manifest(checkpoint: Path) -> dict[str, Any] | None:
    """The recorded manifest, None if there is none; an unreadable one is an error naming it."""
    path = manifest_path(checkpoint)
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        fmt = manifest["format"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"checkpoint {checkpoint}: manifest {path} is unreadable: {err}") from err
    if fmt != MANIFEST_FORMAT or not isinstance(files, dict):
        raise CheckpointError(
            f"checkpoint {checkpoint}: manifest {path} has format {fmt!r}; this version reads {MANIFEST_FORMAT}"
        )
    return manifest


def verify_checkpoint(checkpoint: str | Path, hashes: bool = True) -> bool:
    """Check every file of ``checkpoint`` against its manifest (sizes only with ``hashes=False``).

    Returns True when verified, False when there is no manifest (unverified but accepted).
    Raises CheckpointError naming the first file that is missing, of another size or whose
    sha256 differs, and any file the manifest does not list.
    """
    checkpoint = Path(checkpoint)
    if not checkpoint.exists():
        raise CheckpointError(f"checkpoint {checkpoint} does not exist")
    manifest = read_manifest(checkpoint)
    if manifest is None:
        return False
    members = _members(checkpoint)
    recorded: dict[str, Any] = manifest["files"]
    for name, entry in recorded.items():
        path = members.get(name)
        shown = checkpoint if name == "." else checkpoint / name
        if path is None:
            raise CheckpointError(f"checkpoint {checkpoint}: {shown} is missing (listed in its manifest)")
        size = path.stat().st_size
        if size != entry.get("bytes"):
            raise CheckpointError(
                f"checkpoint {checkpoint}: {shown} has {size} bytes, its manifest says {entry.get('bytes')} "
                "(truncated or replaced)"
            )
        if hashes and file_sha256(path) != entry.get("sha256"):
            raise CheckpointError(
                f"checkpoint {checkpoint}: {shown} does not match the sha256 in its manifest (the bytes changed)"
            )
    extra = sorted(set(members) - set(recorded))
    if extra:
        raise CheckpointError(f"checkpoint {checkpoint}: files not in its manifest: {', '.join(extra)}")
    return True
