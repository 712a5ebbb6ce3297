"""Atomic filesystem writes: a reader sees the old file (or folder) or the new one, never a mix.

Every file Orchestra writes that another process may read while it is being written (a
checkpoint, summary.json, a prepared dataset, an exported folder) goes through here: the data
lands in a temp name beside the final one (same filesystem, so the rename is atomic), then one
``os.replace`` puts it in place. Temp names carry :data:`TMP_MARK` and the writer's pid, so
ranks writing at once never share a temp file and readers can skip temp files by name.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TMP_MARK = ".tmp-"


def temp_name(path: Path, hidden: bool = False) -> Path:
    """A per-process temp path beside ``path``; ``hidden`` puts a dot in front (for folders)."""
    prefix = "." if hidden else ""
    return path.with_name(f"{prefix}{path.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _fsync_dir(directory: Path) -> None:
    """Make a rename inside ``directory`` durable (a crash after it must not undo it)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes, durable: bool = False) -> None:
    """Write ``data`` to ``path`` by temp file + rename; ``durable`` fsyncs the file and the rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    if durable:
        _fsync_dir(path.parent)


def atomic_write_text(
    path: str | Path, text: str, durable: bool = False, only_if_changed: bool = False
) -> None:
    """:func:`atomic_write_bytes` for text; ``only_if_changed`` leaves an identical file untouched.

    Safe when every rank writes the same text at once: each has its own temp name.
    """
    path = Path(path)
    if only_if_changed and path.is_file() and path.read_text() == text:
        return
    atomic_write_bytes(path, text.encode(), durable=durable)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` by temp file + fsync + rename: a kill mid-save leaves the previous file intact."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except RuntimeError as err:
        # torch's zip writer turns a failed write (a full disk, EIO) into a RuntimeError about
        # "unexpected pos" while closing; the OSError behind it is what the caller can act on.
        cause = _os_error_behind(err)
        if cause is None:
            raise
        raise OSError(cause.errno, cause.strerror, str(path)) from err
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    _fsync_dir(path.parent)


def _os_error_behind(err: BaseException) -> OSError | None:
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def atomic_link(source: str | Path, path: str | Path) -> None:
    """Make ``path`` a hard link to ``source``, replacing it atomically (instant for any size)."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        os.link(source, tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def swap_into_place(tmp: Path, final: Path) -> None:
    """Make the finished directory ``tmp`` appear as ``final`` (replacing an existing one) by renames.

    An existing ``final`` is moved aside first and deleted only once the new one is in place; if
    the second rename fails the old one is put back, so a reader sees the old or the new, never a mix.
    """
    if final.exists():
        old = final.with_name(f".{final.name}{TMP_MARK}old-{uuid.uuid4().hex[:8]}")
        os.replace(final, old)
        try:
            os.replace(tmp, final)
        except BaseException:
            os.replace(old, final)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


@contextlib.contextmanager
def staged_dir(final: str | Path) -> Iterator[Path]:
    """A hidden temp folder beside ``final`` to write into; on success it replaces ``final``.

    On failure (an exception, including KeyboardInterrupt) the temp folder is removed and
    ``final`` is untouched. A kill leaves only a ``.<name>.tmp-*`` folder, which
    :func:`remove_stale` clears.
    """
    final = Path(os.path.abspath(final))
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(final, hidden=True)
    tmp.mkdir()
    try:
        yield tmp
        swap_into_place(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_stale(final: str | Path) -> None:
    """Delete the temp folders a killed :func:`staged_dir` left beside ``final``."""
    final = Path(final)
    for stale in final.parent.glob(f".{final.name}{TMP_MARK}*"):
        shutil.rmtree(stale, ignore_errors=True)
