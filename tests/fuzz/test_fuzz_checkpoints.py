"""Fuzzed and hostile checkpoints (hypothesis): random bytes, truncations, flipped bytes, wrong
shapes and pickles carrying code.

Each is refused with one CheckpointError naming the file (or, untouched, loads); resume=auto
falls back to the older good checkpoint; no file of the run dir is changed; no code in a pickle
ever runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pickle
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestra.train.checkpoint import (
    CheckpointError,
    checkpoint_step,
    load_checkpoint_file,
    read_meta,
    scan_checkpoints,
    verify_checkpoint,
)
from orchestra.train.checkpoint.load import load_model_from_checkpoint
from orchestra.train.checkpoint.manifest import manifest_path, write_manifest
from orchestra.train.run import train
from tests.helpers import tiny_config

FUZZ = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
OUTCOMES: Counter[str] = Counter()
SENTINEL = Path(tempfile.gettempdir()) / f"orchestra-pickle-ran-{os.getpid()}"


@pytest.fixture(scope="module", autouse=True)
def report_outcomes() -> Iterator[None]:
    yield
    print("\nfuzz outcomes:", dict(sorted(OUTCOMES.items())))


def digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


class RunsCode:
    """Unpickling this calls open() on the sentinel: the proof that code ran."""

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (str(SENTINEL), "w"))


def every_reader(path: Path) -> None:
    """What resume, generate and export do with a checkpoint file."""
    verify_checkpoint(path)
    load_checkpoint_file(path)
    read_meta(path)
    load_model_from_checkpoint(path)


damage = st.one_of(
    st.tuples(st.just("random"), st.binary(max_size=4096), st.booleans()),
    st.tuples(st.just("truncate"), st.floats(0.0, 0.999), st.booleans()),
    st.tuples(st.just("flip"), st.tuples(st.floats(0.0, 0.999), st.integers(1, 255)), st.booleans()),
)


@settings(FUZZ, max_examples=40)
@given(change=damage)
def test_a_damaged_checkpoint_is_refused_and_resume_falls_back(
    change: tuple[str, Any, bool], trained_run: Path
) -> None:
    how, arg, keep_manifest = change
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        shutil.copytree(trained_run, run)
        target = run / "checkpoints" / "step0000030.ckpt"
        raw = target.read_bytes()
        if how == "random":
            new = arg
        elif how == "truncate":
            new = raw[: int(arg * len(raw))]
        else:
            at, mask = int(arg[0] * len(raw)), arg[1]
            new = raw[:at] + bytes([raw[at] ^ mask]) + raw[at + 1 :]
        target.write_bytes(new)
        (
            run / "checkpoints" / "last.ckpt"
        ).unlink()  # last.ckpt is step 30 too: leave step 20 the newest good one
        if not keep_manifest:
            manifest_path(target).unlink()
        before = digest(run)
        try:
            every_reader(target)
        except CheckpointError as err:
            OUTCOMES[f"{how} refused"] += 1
            assert str(target) in str(err), str(err)
        else:
            # Without a manifest a flipped byte can land where torch does not look (zip padding,
            # a tensor's value): the file is then a readable checkpoint, read unverified.
            OUTCOMES[f"{how} read (no manifest)"] += 1
            assert not keep_manifest and how == "flip", how
        scan = scan_checkpoints(run)
        assert scan.best is not None
        if keep_manifest or scan.best != target:
            assert checkpoint_step(scan.best) == 20 and target in [p for p, _ in scan.skipped]
        assert digest(run) == before  # reading and scanning change nothing


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_a_pickle_carrying_code_is_refused_and_never_runs(
    how: str, trained_run: Path, tmp_path: Path
) -> None:
    SENTINEL.unlink(missing_ok=True)
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    target = run / "checkpoints" / "step0000030.ckpt"
    good = torch.load(target, weights_only=True)
    hostile = {**good, "callbacks": RunsCode()}
    with open(target, "wb") as f:
        if how == "torch.save":
            torch.save(hostile, f)
        else:
            pickle.dump(hostile, f)
    write_manifest(target)  # a manifest that vouches for the hostile bytes: integrity is not safety
    (run / "checkpoints" / "last.ckpt").unlink()
    with pytest.raises(CheckpointError, match=str(target)):
        every_reader(target)
    scan = scan_checkpoints(run)
    assert scan.best is not None and checkpoint_step(scan.best) == 20
    cfg = tiny_config(Path("unused"), Path("unused"), run)
    with pytest.raises(CheckpointError, match=str(target)):
        from orchestra.train.run import resolve_resume

        resolve_resume(dataclasses.replace(cfg, resume=str(target)), run)
    assert not SENTINEL.exists()


@pytest.mark.slow
def test_a_checkpoint_with_wrong_shapes_is_refused_naming_the_tensor(
    corpus_dir: Path, data_cache: Path, trained_run: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    target = run / "checkpoints" / "step0000030.ckpt"
    ckpt = torch.load(target, weights_only=True)
    name = next(k for k in ckpt["state_dict"] if k.endswith("attention_norm.weight") or "norm" in k)
    ckpt["state_dict"][name] = torch.zeros(ckpt["state_dict"][name].shape[0] + 1)
    torch.save(ckpt, target)
    write_manifest(target)
    before = digest(run)
    short = name.removeprefix("model.")
    with pytest.raises(CheckpointError, match=rf"{short}.*shape"):
        load_model_from_checkpoint(target)
    cfg = tiny_config(corpus_dir, data_cache, run, max_steps=35)
    with pytest.raises(CheckpointError, match=rf"{short}.*shape"):
        train(dataclasses.replace(cfg, resume=str(target)))
    changed = {k for k in set(before) | set(digest(run)) if before.get(k) != digest(run).get(k)}
    assert not {k for k in changed if k.startswith("checkpoints/")}, changed
