"""Fuzzed Hydra overrides: a config either composes into a valid TrainConfig or fails with one clear
message naming the key -- never a traceback.

In-process, each override list goes through the steps of ``orchestra-train`` (orchestra/cli/train.py):
the misspelled-key pre-check, Hydra's compose with conf/, ``to_config`` and ``validate_run`` (what
the ValidateBeforeRun callback runs). Hydra prints its own HydraException / OmegaConf errors as one
message; anything else it prints with a traceback, and ValidateBeforeRun turns only a ConfigError
into a clean ``error:`` line. A few real subprocess runs check the same from the outside.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import tempfile
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf.errors import OmegaConfBaseException

from orchestra.cli.common import CONF_DIR
from orchestra.cli.train import misspelled_override, to_config
from orchestra.config import ConfigError, TrainConfig, register_configs
from orchestra.train.run import validate_run
from tests.fuzz.fuzzkit import FUZZ

register_configs()


def _leaf_keys(node: type, prefix: str = "") -> dict[str, Any]:
    """Every settable key of the schema (``trainer.max_steps``, ``seed``) and its field type."""
    out: dict[str, Any] = {}
    for f in fields(node):
        key = f"{prefix}{f.name}"
        sub = f.default_factory() if callable(f.default_factory) else None
        if sub is not None and is_dataclass(sub):
            out.update(_leaf_keys(type(sub), key + "."))
        else:
            out[key] = f.type
    return out


LEAVES = _leaf_keys(TrainConfig)
SECTIONS = {k.split(".")[0] for k in LEAVES if "." in k}
GROUPS = {g: sorted(p.stem for p in (Path(CONF_DIR) / g).glob("*.yaml")) for g in (*SECTIONS, "experiment")}
GROUPS = {g: opts for g, opts in GROUPS.items() if opts}
UNSET_ENV = "ORCHESTRA_FUZZ_UNSET_VARIABLE"

quoted_text = st.text(max_size=10).map(lambda s: "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'")
VALUES = st.one_of(
    st.integers(-(10**25), 10**25).map(str),
    st.integers(-3, 3).map(str),
    st.sampled_from(["nan", "inf", "-inf", "1e400", "1.5", "-0.0", "1e-9", "0x10", "1_000"]),
    st.sampled_from(["true", "false", "null", "True", "NULL", "", "???"]),
    st.from_regex(r"[a-z_][a-z0-9_\-/]{0,8}", fullmatch=True),
    st.sampled_from(["[a]", "[1,2]", "[]", "[[1]]", "[true]", "[-1]", "[0.5,0.5,0.5]", "{a:1}", "{}", "[1"]),
    quoted_text,
    st.text(max_size=6),  # raw unicode, mostly outside Hydra's override grammar
    st.sampled_from(
        ["${foo}", f"${{oc.env:{UNSET_ENV}}}", "${trainer.max_steps}", "${model.dim}", "${", "${.x}"]
    ),
)


def _misspell(key: str, draw: st.DrawFn) -> str:
    """``key`` with one character of its last part inserted, replaced or deleted."""
    head, _, last = key.rpartition(".")
    i = draw(st.integers(0, len(last)))
    ch = draw(st.sampled_from("abcdefghijklmnopqrstuvwxyz_0"))
    how = draw(st.sampled_from(["insert", "replace", "delete"]))
    if how == "insert":
        last = last[:i] + ch + last[i:]
    elif how == "replace" and i < len(last):
        last = last[:i] + ch + last[i + 1 :]
    else:
        last = last[:i] + last[i + 1 :]
    return f"{head}.{last}" if head else last


@st.composite
def overrides(draw: st.DrawFn, subprocess_safe: bool = False) -> list[str]:
    """1-4 overrides: real keys with random values, group choices, misspelled / unknown keys, garbage."""
    keys = sorted(LEAVES)
    groups = sorted(GROUPS)
    if subprocess_safe:  # the data group and experiment=debug could start a real corpus download
        keys = [k for k in keys if not k.startswith("data.")]
        groups = [g for g in groups if g not in ("data", "experiment")]
    out = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(
            st.sampled_from(["value", "value", "value", "group", "misspelled", "unknown", "edit", "raw"])
        )
        if kind == "value":
            out.append(f"{draw(st.sampled_from(keys))}={draw(VALUES)}")
        elif kind == "group":
            group = draw(st.sampled_from(groups))
            choice = draw(
                st.one_of(st.sampled_from(GROUPS[group]), st.from_regex(r"[a-z0-9\-]{1,8}", fullmatch=True))
            )
            out.append(f"{group}={choice}")
        elif kind == "misspelled":
            out.append(f"{_misspell(draw(st.sampled_from(keys)), draw)}={draw(VALUES)}")
        elif kind == "unknown":
            key = draw(st.from_regex(r"[a-z_]{1,6}(\.[a-z_]{1,6}){0,2}", fullmatch=True))
            out.append(f"{key}={draw(VALUES)}")
        elif kind == "edit":
            key = draw(st.sampled_from(keys))
            out.append(
                draw(st.sampled_from([f"+{key}={draw(VALUES)}", f"~{key}", f"++{key}={draw(VALUES)}"]))
            )
        else:  # structural garbage in the grammar's own alphabet (no '-': that would be a CLI flag)
            text = draw(st.text(alphabet="ab.=[]{}'\",$:~+ 01ü", max_size=12))
            out.append("x" + text if subprocess_safe else text)
    return out


def _named_keys(args: list[str]) -> list[str]:
    """The key part of every override (``+``/``~`` stripped), and the whole override for parse errors."""
    keys = []
    for arg in args:
        keys.append(arg)
        key = arg.split("=", 1)[0].lstrip("+~")
        if key:
            keys.append(key)
    return keys


def cli_outcome(args: list[str]) -> tuple[str, Any]:
    """What ``orchestra-train <args>`` does, in-process: ("ok", TrainConfig) or (stage, its one message).

    An exception the CLI would print with a traceback is not caught here, so the test fails on it.
    """
    message = misspelled_override(args)
    if message is not None:
        return "precheck", message
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose("config", overrides=list(args))
    except (HydraException, OmegaConfBaseException) as err:  # Hydra prints these as one message
        return "hydra", f"{err}\n{err.__cause__ or ''}"
    # ValidateBeforeRun and _main: only a ConfigError becomes a clean "error:" line.
    try:
        config = to_config(cfg)
        validate_run(config)
    except ConfigError as err:
        return "config", str(err)
    return "ok", config


def _assert_clear(stage: str, result: Any, args: list[str]) -> None:
    if stage == "ok":
        assert isinstance(result, TrainConfig)
        assert math.isfinite(result.optim.lr), f"{args}: accepted a non-finite optim.lr={result.optim.lr}"
        return
    message: str = result
    assert message.strip(), (args, stage)
    if stage == "config":
        key = message.split(":", 1)[0]
        assert key in LEAVES or key in SECTIONS, (args, message)
    else:
        assert any(k in message for k in _named_keys(args)), (args, message)


@settings(FUZZ, max_examples=150)
@given(args=overrides())
def test_fuzzed_overrides_give_a_config_or_one_message_naming_the_key(args: list[str]) -> None:
    """Any override list: a valid TrainConfig, or one clean error whose message names an override's key."""
    stage, result = cli_outcome(args)
    _assert_clear(stage, result, args)


def run_cli(args: list[str], root: Path) -> subprocess.CompletedProcess[str]:
    """``python -m orchestra.cli.train``, its corpus pinned to a path that does not exist (fails fast)."""
    env = {**os.environ, "ORCHESTRA_RUNS": str(root / "runs"), "HYDRA_FULL_ERROR": "0"}
    env.pop(UNSET_ENV, None)
    pinned = [
        "energy=none",
        "data=files",
        f"data.paths=[{root}/missing/*.txt]",
        f"data.cache_dir={root / 'data'}",
    ]
    return subprocess.run(
        [sys.executable, "-m", "orchestra.cli.train", *args, *pinned],
        capture_output=True,
        text=True,
        env=env,
        cwd=root,
        timeout=120,
    )


def _assert_clean_exit(args: list[str], proc: subprocess.CompletedProcess[str], root: Path) -> None:
    out = proc.stdout + proc.stderr
    assert proc.returncode in (1, 2), (args, proc.returncode, out[-2000:])
    assert "Traceback" not in out, (args, out[-3000:])
    if "invalid configuration" in out or proc.returncode == 1:  # refused before the run started
        assert not (root / "runs").exists(), (args, out[-2000:])


@settings(FUZZ, max_examples=2)
@given(args=overrides(subprocess_safe=True))
def test_the_cli_exits_1_or_2_without_a_traceback(args: list[str]) -> None:
    """A real ``orchestra-train`` run of fuzzed overrides: exit code 1 or 2, one message, no traceback;
    a run refused for its configuration writes no run dir."""
    with tempfile.TemporaryDirectory() as tmp:
        _assert_clean_exit(args, run_cli(args, Path(tmp)), Path(tmp))


# Minimal reproducers of what the fuzzing found (a fuzz run stops at its first failure).
KNOWN = [
    ["=3"],  # an empty key: Hydra raises a bare ValueError, printed with a traceback
    ["trainer.max_steps=${foo}"],  # an interpolation to a missing key: to_config raises past the callback
    [f"name=${{oc.env:{UNSET_ENV}}}"],  # an unset environment variable
    ["data.cache_dir={"],  # a parse error whose message does not say which override
    ["optim.lr=inf"],  # accepted: a run with an infinite learning rate
]


@pytest.mark.parametrize("args", KNOWN, ids=[a[0] for a in KNOWN])
def test_known_bad_overrides_get_one_clear_message(args: list[str]) -> None:
    """The minimal override lists the fuzzing found: a clean refusal naming the key, like any other."""
    stage, result = cli_outcome(args)
    _assert_clear(stage, result, args)
    assert stage != "ok", (args, "accepted")


@pytest.mark.parametrize("args", [["=3"], ["trainer.max_steps=${foo}"]], ids=["empty-key", "interpolation"])
def test_known_bad_overrides_exit_without_a_traceback(args: list[str]) -> None:
    """The same from the outside: ``orchestra-train`` exits 1 or 2 with no traceback and no run dir."""
    with tempfile.TemporaryDirectory() as tmp:
        proc = run_cli(args, Path(tmp))
        _assert_clean_exit(args, proc, Path(tmp))
        assert not (Path(tmp) / "runs").exists(), (args, (proc.stdout + proc.stderr)[-2000:])
