"""A real full filesystem and a real read-only checkpoint dir during a save (root: tmpfs, bind mount).

The run stops with one CheckpointError naming the file and the cause, the previous checkpoints
are intact and verified, no temp file is left, and once the space is back resume=auto finishes
the run exactly as if nothing had happened. Without root (or mount rights) the tests are
skipped; tests/train/test_checkpoint_manifest.py injects the same errors without a mount.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestra.train.checkpoint import CheckpointError, checkpoint_step, verify_checkpoint
from orchestra.train.checkpoint.io import AtomicCheckpointIO
from orchestra.train.run import train
from tests.helpers import tiny_config
from tests.train.test_run import column, read_metrics

STEPS, EVERY = 12, 4


def _mount(*args: str) -> None:
    proc = subprocess.run(["mount", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount ({proc.stderr.strip() or proc.returncode}); the shim tests cover this")


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 64 MiB tmpfs, unmounted afterwards."""
    if os.name != "posix" or os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    root = tmp_path / "fs"
    root.mkdir()
    _mount("-t", "tmpfs", "-o", "size=64m", "tmpfs", str(root))
    try:
        yield root
    finally:
        subprocess.run(["umount", "-l", str(root)], check=False)


def after_first_checkpoint(monkeypatch: pytest.MonkeyPatch, action: Any) -> None:
    """Run ``action(checkpoint_dir)`` once, as soon as the first step checkpoint and last.ckpt exist."""
    original = AtomicCheckpointIO.save_checkpoint
    done: list[bool] = []

    def save_checkpoint(
        self: AtomicCheckpointIO, checkpoint: dict[str, Any], path: Any, storage_options: Any = None
    ) -> None:
        original(self, checkpoint, path, storage_options)
        ckpts = Path(path).parent
        if not done and (ckpts / "last.ckpt").exists() and list(ckpts.glob("step*.ckpt")):
            done.append(True)
            action(ckpts)

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", save_checkpoint)


def reference_losses(corpus_dir: Path, data_cache: Path, tmp_path: Path) -> dict[int, str]:
    run = tmp_path / "reference"
    train(tiny_config(corpus_dir, data_cache, run, max_steps=STEPS, ckpt_every_n_steps=EVERY))
    return column(read_metrics(run), "train/loss")


def check_after_failure(run: Path, err: pytest.ExceptionInfo[CheckpointError], cause: str) -> None:
    ckpts = run / "checkpoints"
    assert f"step{2 * EVERY:07d}.ckpt" in str(err.value) and cause in str(err.value)
    assert "the previous checkpoints are intact" in str(err.value)
    assert not [p.name for p in ckpts.iterdir() if ".tmp-" in p.name]
    for name in (f"step{EVERY:07d}.ckpt", "last.ckpt"):
        assert verify_checkpoint(ckpts / name) and checkpoint_step(ckpts / name) == EVERY


def test_disk_full_during_a_save(
    small_fs: Path, corpus_dir: Path, data_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    want = reference_losses(corpus_dir, data_cache, tmp_path)
    run = small_fs / "run"
    filler = small_fs / "filler"

    def fill(ckpts: Path) -> None:
        # Leave room for the metrics rows, not for another checkpoint.
        size = (ckpts / "last.ckpt").stat().st_size
        stat = os.statvfs(small_fs)
        free = stat.f_bavail * stat.f_frsize
        with open(filler, "wb") as f:
            f.truncate(0)
            f.write(b"\0" * max(0, free - size // 4))

    after_first_checkpoint(monkeypatch, fill)
    cfg = tiny_config(corpus_dir, data_cache, run, max_steps=STEPS, ckpt_every_n_steps=EVERY)
    with pytest.raises(CheckpointError) as err:
        train(cfg)
    check_after_failure(run, err, "No space left on device")

    monkeypatch.undo()
    filler.unlink()
    result = train(cfg)  # resume=auto from the intact checkpoint
    assert result.summary["resumed_from"].endswith(f"step{EVERY:07d}.ckpt")
    assert column(read_metrics(run), "train/loss") == want


def test_read_only_checkpoint_dir_during_a_save(
    small_fs: Path, corpus_dir: Path, data_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    want = reference_losses(corpus_dir, data_cache, tmp_path)
    run = small_fs / "run"
    mounted: list[Path] = []

    def read_only(ckpts: Path) -> None:
        _mount("--bind", str(ckpts), str(ckpts))
        mounted.append(ckpts)
        _mount("-o", "remount,ro,bind", str(ckpts))

    after_first_checkpoint(monkeypatch, read_only)
    cfg = tiny_config(corpus_dir, data_cache, run, max_steps=STEPS, ckpt_every_n_steps=EVERY)
    try:
        with pytest.raises(CheckpointError) as err:
            train(cfg)
        check_after_failure(run, err, "Read-only file system")
    finally:
        for path in mounted:
            subprocess.run(["umount", str(path)], check=False)
    monkeypatch.undo()
    result = train(cfg)
    assert result.summary["resumed_from"].endswith(f"step{EVERY:07d}.ckpt")
    assert column(read_metrics(run), "train/loss") == want
