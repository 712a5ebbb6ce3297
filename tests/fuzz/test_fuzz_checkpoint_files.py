"""Fuzzed checkpoint files against every reader of them.

A run dir holds a good ``step0000010.ckpt`` and, as the newer ``step0000020.ckpt``, one fuzzed
file: random bytes; a valid tiny checkpoint truncated or with flipped bytes (with and without its
sha256 manifest); tensors of the wrong shape or dtype, or missing; no state_dict / global_step /
Orchestra metadata, or randomly altered metadata; pickles whose ``__reduce__`` would run code
(torch.save and plain pickle). Each is fed to load_checkpoint_file, verify_checkpoint, read_meta,
load_model_from_checkpoint, load_base (finetune.init_from), plan_run with resume=<file>, and to
scan_checkpoints / find_resume_checkpoint / plan_run with resume=auto over the run dir.

Property: a CheckpointError (ConfigError from load_base / plan_run) naming the file, or success
where the file is intact (or its fate cannot be told, e.g. flipped bytes with no manifest);
resume=auto falls back to step 10 (or refuses naming the newer file) unless the newer one is
usable; no reader ever runs code from a pickle (the sentinel file never appears) and no reader
changes or deletes a file of the checkpoint dir.
"""

from __future__ import annotations

import builtins
import os
import pickle
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st

from orchestra.config import ConfigError, DataConfig, TrainConfig, padded_vocab_size, to_plain
from orchestra.data.dataset import load_manifest
from orchestra.model import Transformer
from orchestra.train.checkpoint import (
    CHECKPOINT_DIRNAME,
    AtomicCheckpointIO,
    CheckpointError,
    CheckpointMeta,
    find_resume_checkpoint,
    load_checkpoint_file,
    read_meta,
    scan_checkpoints,
    verify_checkpoint,
)
from orchestra.train.checkpoint.load import load_model_from_checkpoint
from orchestra.train.checkpoint.manifest import manifest_path, remove_manifest, write_manifest
from orchestra.train.finetune import load_base
from orchestra.train.run import plan_run
from tests.fuzz import fuzzkit
from tests.fuzz.fuzzkit import FUZZ, flip, tree_digest
from tests.helpers import tiny_config


@pytest.fixture(scope="module")
def data_config(tmp_path_factory: pytest.TempPathFactory) -> DataConfig:
    """The data section the shared fuzz dataset was prepared with (fuzzkit)."""
    return fuzzkit.fuzz_data_config(tmp_path_factory)


@pytest.fixture(scope="module")
def base_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared, intact fuzz dataset (prepared once per session)."""
    return fuzzkit.fuzz_dataset(tmp_path_factory)


pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # resume=auto names what it skips


# ------------------------------------------------------------------ a valid tiny checkpoint


@dataclass(frozen=True)
class Tiny:
    """The pretrain tiny config on the fuzz dataset, and a checkpoint dict that fits it."""

    config: TrainConfig
    checkpoint: dict[str, Any]


def tiny_checkpoint(cfg: TrainConfig, dataset_dir: Path, step: int) -> dict[str, Any]:
    manifest = load_manifest(dataset_dir)
    vocab = padded_vocab_size(cfg.model, int(manifest["vocab_size"]))
    torch.manual_seed(step)
    model = Transformer(cfg.model, vocab)
    meta = CheckpointMeta(
        model_config=cfg.model,
        vocab_size=vocab,
        tokenizer_json=(dataset_dir / "tokenizer.json").read_text(),
        eos_id=int(manifest["eos_id"]),
    )
    return {
        "epoch": 0,
        "global_step": step,
        "pytorch-lightning_version": "2.5.0",
        "state_dict": {f"model.{k}": v.clone() for k, v in model.state_dict().items()},
        "loops": {},
        "callbacks": {},
        "optimizer_states": [],
        "lr_schedulers": [],
        "hyper_parameters": {"config": to_plain(cfg)},
        "orchestra": meta.to_dict(),
    }


@pytest.fixture(scope="module")
def tiny(base_dataset: Path, data_config: DataConfig) -> Tiny:
    base = tiny_config(Path("unused"), Path("unused"), Path("unused"))
    cfg = replace(base, data=data_config)
    return Tiny(cfg, tiny_checkpoint(cfg, base_dataset, 20))


# ------------------------------------------------------------------ pickles that carry code


class RunsCode:
    """Unpickling this calls ``func(*args)``: a weights-only loader must refuse it."""

    def __init__(self, func: Callable[..., Any], *args: Any) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[Any, ...]:
        return self.func, self.args


def code_payloads(sentinel: Path) -> dict[str, RunsCode]:
    return {
        "os.system": RunsCode(os.system, f"touch {sentinel}"),
        "exec": RunsCode(builtins.exec, f"open({str(sentinel)!r}, 'w').close()"),
        "Path.touch": RunsCode(Path.touch, sentinel),
    }


# ------------------------------------------------------------------ the fuzzed file


KINDS = [
    "intact",
    "random-bytes",
    "truncated",
    "flipped",
    "wrong-shapes",
    "missing-tensors",
    "wrong-dtype",
    "no-state_dict",
    "no-global_step",
    "not-a-dict",
    "no-meta",
    "meta-fuzzed",
    "code-torch-save",
    "code-in-state_dict",
    "code-plain-pickle",
]
# Kinds load_checkpoint_file itself must refuse.
UNREADABLE = {
    "random-bytes",
    "truncated",
    "no-state_dict",
    "no-global_step",
    "not-a-dict",
    "code-torch-save",
    "code-in-state_dict",
    "code-plain-pickle",
}

meta_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 10**6),
    st.floats(),
    st.text(max_size=8),
    st.lists(st.integers(), max_size=2),
)


def write_fuzzed(
    path: Path, kind: str, with_manifest: bool, tiny: Tiny, sentinel: Path, data: st.DataObject
) -> str:
    """Write the fuzzed checkpoint to ``path``; returns its kind ("intact" if the damage cancelled out)."""
    ckpt = {**tiny.checkpoint, "state_dict": dict(tiny.checkpoint["state_dict"])}
    state = ckpt["state_dict"]
    names = sorted(state)
    payload = code_payloads(sentinel)[data.draw(st.sampled_from(["os.system", "exec", "Path.touch"]))]
    manifest_first = False  # the manifest of the intact file, written before the damage
    if kind == "random-bytes":
        path.write_bytes(data.draw(st.binary(max_size=2048)))
    elif kind in ("intact", "truncated", "flipped"):
        torch.save(ckpt, path)
        manifest_first = True
    elif kind == "wrong-shapes":
        for name in data.draw(st.lists(st.sampled_from(names), min_size=1, max_size=3, unique=True)):
            shape = list(state[name].shape)
            axis = data.draw(st.integers(0, len(shape) - 1))
            shape[axis] = max(1, shape[axis] + data.draw(st.sampled_from([-1, 1, 7])))
            state[name] = torch.zeros(shape) if data.draw(st.booleans()) else torch.zeros(shape[::-1])
        torch.save(ckpt, path)
    elif kind == "missing-tensors":
        for name in data.draw(st.lists(st.sampled_from(names), min_size=1, max_size=3, unique=True)):
            del state[name]
        torch.save(ckpt, path)
    elif kind == "wrong-dtype":
        dtype = data.draw(
            st.sampled_from([torch.float16, torch.bfloat16, torch.int64, torch.bool, torch.float64])
        )
        for name in data.draw(st.lists(st.sampled_from(names), min_size=1, max_size=3, unique=True)):
            state[name] = state[name].to(dtype)
        torch.save(ckpt, path)
    elif kind in ("no-state_dict", "no-global_step", "no-meta"):
        del ckpt[
            {"no-state_dict": "state_dict", "no-global_step": "global_step", "no-meta": "orchestra"}[kind]
        ]
        torch.save(ckpt, path)
    elif kind == "not-a-dict":
        torch.save(data.draw(st.sampled_from([[1, 2], "state_dict", torch.zeros(3), None])), path)
    elif kind == "meta-fuzzed":
        meta = dict(ckpt["orchestra"])
        meta["model_config"] = dict(meta["model_config"])
        target = meta if data.draw(st.booleans()) else meta["model_config"]
        key = data.draw(st.sampled_from(sorted(target)))
        if data.draw(st.booleans()):
            del target[key]
        else:
            target[key] = data.draw(meta_values)
        ckpt["orchestra"] = meta
        torch.save(ckpt, path)
    elif kind == "code-torch-save":
        torch.save(payload, path)
    elif kind == "code-in-state_dict":
        torch.save({**ckpt, "state_dict": {**state, "model.evil": payload}}, path)
    elif kind == "code-plain-pickle":
        with open(path, "wb") as f:
            pickle.dump({"state_dict": payload, "global_step": 20}, f, protocol=data.draw(st.integers(0, 5)))
    else:
        raise AssertionError(kind)
    if manifest_first and with_manifest:
        write_manifest(path)
    raw = path.read_bytes()
    if kind == "truncated":
        path.write_bytes(raw[: int(data.draw(st.floats(0, 0.999)) * len(raw))])
    elif kind == "flipped":
        damaged = raw
        for _ in range(data.draw(st.integers(1, 3))):
            damaged = flip(damaged, data.draw(st.floats(0, 1)), data.draw(st.integers(1, 255)))
        path.write_bytes(damaged)
    if with_manifest and not manifest_first:
        write_manifest(path)  # a manifest that vouches for these very bytes
    if not with_manifest:
        remove_manifest(path)
    if kind in ("truncated", "flipped") and path.read_bytes() == raw:
        return "intact"  # two flips of one byte with one mask, or a cut at the very end
    return kind


# ------------------------------------------------------------------ the readers and what they must do

OK, REFUSE, EITHER = "ok", "refuse", "either"


def expectations(kind: str, with_manifest: bool) -> dict[str, str]:
    """What each reader must do with the newer file."""
    if kind == "intact":
        return dict.fromkeys(["load", "verify", "meta", "model", "base", "plan", "auto"], OK)
    if kind in UNREADABLE:
        verify = REFUSE if kind == "truncated" and with_manifest else EITHER
        return {"load": REFUSE, "verify": verify, "meta": REFUSE, "model": REFUSE, "base": REFUSE, "plan": REFUSE,
                "auto": "fall back"}  # fmt: skip
    if kind == "flipped":
        if with_manifest:
            return {"load": EITHER, "verify": REFUSE, "meta": EITHER, "model": REFUSE, "base": EITHER,
                    "plan": REFUSE, "auto": "fall back"}  # fmt: skip
        return dict.fromkeys(["load", "verify", "meta", "model", "base", "plan", "auto"], EITHER)
    if kind in ("wrong-shapes", "missing-tensors"):
        return {"load": OK, "verify": OK, "meta": OK, "model": REFUSE, "base": EITHER, "plan": REFUSE,
                "auto": "fall back or refuse"}  # fmt: skip
    if kind == "no-meta":
        return {"load": OK, "verify": OK, "meta": REFUSE, "model": REFUSE, "base": REFUSE, "plan": REFUSE,
                "auto": "fall back or refuse"}  # fmt: skip
    assert kind in ("wrong-dtype", "meta-fuzzed"), kind
    return {"load": OK, "verify": OK, "meta": EITHER, "model": EITHER, "base": EITHER, "plan": EITHER,
            "auto": EITHER}  # fmt: skip


def outcome(
    call: Callable[[], Any], path: Path, allowed: tuple[type[Exception], ...] = (CheckpointError,)
) -> Any:
    """The call's result, or the refusal (an allowed error naming ``path``); anything else propagates."""
    try:
        return call()
    except allowed as err:
        assert str(path) in str(err), f"{type(err).__name__} does not name {path}: {err}"
        return err


def check(name: str, expected: str, result: Any) -> None:
    refused = isinstance(result, Exception)
    if expected == OK:
        assert not refused, f"{name}: refused a usable checkpoint: {result}"
    elif expected == REFUSE:
        assert refused, f"{name}: accepted the fuzzed checkpoint ({type(result).__name__})"


@settings(FUZZ, max_examples=45)
@given(kind=st.sampled_from(KINDS), with_manifest=st.booleans(), data=st.data())
def test_a_fuzzed_checkpoint_is_refused_naming_it_and_resume_falls_back(
    kind: str, with_manifest: bool, data: st.DataObject, tiny: Tiny
) -> None:
    """Every reader: the named refusal or success its kind allows; resume=auto falls back to the good
    step 10; no code from a pickle ever runs; no file of the checkpoint dir changes."""
    event(f"{kind}{' + manifest' if with_manifest else ''}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        sentinel = root / "code-ran"
        run_dir = root / "run"
        ckpt_dir = run_dir / CHECKPOINT_DIRNAME
        ckpt_dir.mkdir(parents=True)
        good = ckpt_dir / "step0000010.ckpt"
        AtomicCheckpointIO().save_checkpoint({**tiny.checkpoint, "global_step": 10}, good)
        newer = ckpt_dir / "step0000020.ckpt"
        kind = write_fuzzed(newer, kind, with_manifest, tiny, sentinel, data)
        before = tree_digest(ckpt_dir)
        expect = expectations(kind, with_manifest)
        both = (CheckpointError, ConfigError)
        cfg = replace(tiny.config, resume=str(newer), run_dir=str(root / "explicit"))

        results = {
            "load": outcome(lambda: load_checkpoint_file(newer), newer),
            "verify": outcome(lambda: verify_checkpoint(newer), newer),
            "meta": outcome(lambda: read_meta(newer), newer),
            "model": outcome(lambda: load_model_from_checkpoint(newer), newer),
            "base": outcome(lambda: load_base(newer), newer, both),
            "plan": outcome(lambda: plan_run(cfg), newer, both),
        }
        for name, result in results.items():
            check(name, expect[name], result)
        if not isinstance(results["plan"], Exception):
            assert results["plan"].resume_path == newer and results["plan"].resume_step == 20

        scan = scan_checkpoints(run_dir)
        assert find_resume_checkpoint(run_dir) == scan.best
        auto = outcome(
            lambda: plan_run(replace(tiny.config, resume="auto", run_dir=str(run_dir))), newer, both
        )
        if expect["auto"] == OK:
            assert scan.best == newer and not scan.skipped, scan
            assert not isinstance(auto, Exception) and auto.resume_path == newer, auto
        elif expect["auto"] == "fall back":
            assert scan.best == good, f"resume=auto takes {scan.best}, not the intact {good.name}: {scan}"
            assert [p for p, _ in scan.skipped] == [newer], scan
            assert not isinstance(auto, Exception) and auto.resume_path == good, auto
        elif expect["auto"] == "fall back or refuse":
            assert isinstance(auto, Exception) or auto.resume_path == good, (
                f"resume=auto resumed from the unusable {auto.resume_path.name}"
            )
        else:
            assert scan.best in (good, newer), scan

        assert not sentinel.exists(), f"unpickling {kind} ran code"
        assert tree_digest(ckpt_dir) == before, "a reader changed or deleted a checkpoint file"
        assert manifest_path(newer).is_file() == with_manifest


@pytest.mark.parametrize("protocol", [2, 5])
@pytest.mark.parametrize("payload", ["os.system", "exec", "Path.touch"])
def test_a_pickle_that_carries_code_never_runs(tmp_path: Path, payload: str, protocol: int) -> None:
    """Plain pickles and torch.save files whose unpickling would run code are refused, unrun."""
    sentinel = tmp_path / "code-ran"
    evil = code_payloads(sentinel)[payload]
    plain = tmp_path / "plain.ckpt"
    with open(plain, "wb") as f:
        pickle.dump(evil, f, protocol=protocol)
    saved = tmp_path / "saved.ckpt"
    torch.save({"state_dict": {"model.x": evil}, "global_step": 1}, saved, pickle_protocol=protocol)
    for path in (plain, saved):
        for reader in (load_checkpoint_file, read_meta):
            with pytest.raises(CheckpointError, match=str(path)):
                reader(path)
        assert scan_checkpoints(tmp_path).best is None
    assert not sentinel.exists()
    # Unpickled without weights_only the payload does run: the test would notice if it did.
    with open(plain, "rb") as f:
        pickle.load(f)
    assert sentinel.exists()


def test_scan_skips_a_newer_checkpoint_without_a_state_dict(tmp_path: Path, tiny: Tiny) -> None:
    """Minimal reproducer: a newer file load_checkpoint_file refuses (no 'state_dict') must not be taken."""
    ckpt_dir = tmp_path / CHECKPOINT_DIRNAME
    ckpt_dir.mkdir()
    good = ckpt_dir / "step0000010.ckpt"
    AtomicCheckpointIO().save_checkpoint({**tiny.checkpoint, "global_step": 10}, good)
    newer = ckpt_dir / "step0000020.ckpt"
    torch.save({"global_step": 20}, newer)
    with pytest.raises(CheckpointError, match="holds no 'state_dict'"):
        load_checkpoint_file(newer)
    assert scan_checkpoints(tmp_path).best == good


def test_resume_from_a_checkpoint_with_misshapen_tensors_is_refused_before_training(
    tmp_path: Path, tiny: Tiny
) -> None:
    """Minimal reproducer: plan_run(resume=<file>) must refuse tensors that do not fit the model."""
    path = tmp_path / "misshapen.ckpt"
    state = dict(tiny.checkpoint["state_dict"])
    state["model.tok_embeddings.weight"] = torch.zeros(3, 3)
    torch.save({**tiny.checkpoint, "state_dict": state}, path)
    with pytest.raises(CheckpointError, match=str(path)):
        load_model_from_checkpoint(path)
    with pytest.raises(CheckpointError, match=str(path)):
        plan_run(replace(tiny.config, resume=str(path), run_dir=str(tmp_path / "run")))
    shutil.rmtree(tmp_path / "run", ignore_errors=True)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("model_config.dim", None),  # TypeError from torch.empty
        ("model_config.ffn_dim", "wide"),  # TypeError
        ("model_config.n_layers", 2.5),  # TypeError
        ("model_config.n_heads", 0),  # ZeroDivisionError
        ("model_config.dim", -4),  # RuntimeError from torch.empty, outside the load_state_dict guard
        ("tokenizer_json", "not a tokenizer"),  # a bare Exception from Tokenizer.from_str
    ],
)
def test_malformed_metadata_is_refused_naming_the_file(
    tmp_path: Path, tiny: Tiny, key: str, value: Any
) -> None:
    """Minimal reproducers: metadata that cannot build the model or its tokenizer is one CheckpointError."""
    meta = {
        **tiny.checkpoint["orchestra"],
        "model_config": dict(tiny.checkpoint["orchestra"]["model_config"]),
    }
    section, _, name = key.rpartition(".")
    (meta[section] if section else meta)[name] = value
    path = tmp_path / "bad-meta.ckpt"
    torch.save({**tiny.checkpoint, "orchestra": meta}, path)
    with pytest.raises(CheckpointError, match=str(path)):
        load_model_from_checkpoint(path)


def test_a_base_checkpoint_with_a_malformed_tokenizer_is_refused_naming_it(
    tmp_path: Path, tiny: Tiny
) -> None:
    """Minimal reproducer: finetune.init_from=<checkpoint whose tokenizer_json does not parse> is one
    ConfigError naming the file (load_base's _eos_id lets the tokenizers library's bare Exception out)."""
    path = tmp_path / "base.ckpt"
    torch.save(
        {**tiny.checkpoint, "orchestra": {**tiny.checkpoint["orchestra"], "tokenizer_json": "{"}}, path
    )
    with pytest.raises((ConfigError, CheckpointError), match=str(path)):
        load_base(path)
