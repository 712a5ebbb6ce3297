"""orchestra.io: a failed or interrupted write never damages what is already there."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from orchestra.io import (
    TMP_MARK,
    atomic_link,
    atomic_torch_save,
    atomic_write_text,
    remove_stale,
    staged_dir,
    swap_into_place,
)


def test_atomic_write_text_replaces_and_leaves_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "summary.json"
    atomic_write_text(path, "one")
    atomic_write_text(path, "two", durable=True)
    assert path.read_text() == "two"
    assert [p.name for p in path.parent.iterdir()] == ["summary.json"]


def test_only_if_changed_keeps_the_file_untouched(tmp_path: Path) -> None:
    path = tmp_path / "tok.json"
    atomic_write_text(path, "same")
    inode = path.stat().st_ino
    atomic_write_text(path, "same", only_if_changed=True)
    assert path.stat().st_ino == inode  # not rewritten
    atomic_write_text(path, "other", only_if_changed=True)
    assert path.read_text() == "other"


def test_torch_save_failure_keeps_the_previous_file(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"x": torch.ones(2)}, path)

    class Unpicklable:
        def __reduce__(self) -> tuple:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_torch_save({"x": Unpicklable()}, path)
    assert torch.equal(torch.load(path, weights_only=True)["x"], torch.ones(2))
    assert not [p for p in tmp_path.iterdir() if TMP_MARK in p.name]


def test_staged_dir_replaces_whole_or_not_at_all(tmp_path: Path) -> None:
    out = tmp_path / "export"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(ValueError), staged_dir(out) as tmp:
        (tmp / "new.txt").write_text("new")
        raise ValueError("writer failed half way")
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    with staged_dir(out) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_swap_puts_the_old_folder_back_when_the_second_rename_fails(tmp_path: Path, monkeypatch) -> None:
    final, new = tmp_path / "data", tmp_path / "new"
    final.mkdir()
    (final / "a").write_text("old")
    new.mkdir()
    real_replace = os.replace
    calls = []

    def flaky(src, dst) -> None:
        calls.append((src, dst))
        if len(calls) == 2:
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", flaky)
    with pytest.raises(OSError, match="disk full"):
        swap_into_place(new, final)
    assert (final / "a").read_text() == "old"


def test_remove_stale_and_atomic_link(tmp_path: Path) -> None:
    final = tmp_path / "ds"
    (tmp_path / f".ds{TMP_MARK}123-abc").mkdir()
    (tmp_path / ".other.tmp-1").mkdir()
    remove_stale(final)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp-1"]
    src = tmp_path / "step1.ckpt"
    src.write_text("s1")
    atomic_link(src, tmp_path / "last.ckpt")
    assert (tmp_path / "last.ckpt").read_text() == "s1"
    assert (tmp_path / "last.ckpt").stat().st_ino == src.stat().st_ino
