"""Fuzzed Hydra overrides (hypothesis): a valid config, or one clear error naming the key.

Composed the way `orchestra-train` composes them (the misspelling check, Hydra over the schema,
then every validation rule), in process; a few go through the real CLI, which must exit 1 or 2
without a traceback.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf.errors import OmegaConfBaseException

from orchestra.cli.common import CONF_DIR
from orchestra.cli.train import misspelled_override, to_config
from orchestra.config import ConfigError, register_configs
from orchestra.train.run import validate_run

FUZZ = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
OUTCOMES: Counter[str] = Counter()

KEYS = [
    "trainer.max_steps", "trainer.micro_batch_size", "trainer.global_batch_size", "trainer.devices",
    "trainer.precision", "trainer.grad_clip", "trainer.guard", "trainer.guard_spike_factor",
    "trainer.signal_grace_s", "trainer.collective_timeout_s", "trainer.preempt_signal",
    "model.dim", "model.n_layers", "model.n_heads", "model.n_kv_heads", "model.max_seq_len",
    "optim.lr", "optim.weight_decay", "scheduler.warmup_steps", "data.vocab_size", "data.val_fraction",
    "data.skip_steps", "data.loader_workers", "finetune.method", "finetune.lora_rank", "task.name",
    "strategy.name", "seed", "resume", "trainer.max_stepz", "model.dimm", "nonsense.key",
]  # fmt: skip
GROUPS = {
    "model": ["debug", "llama-1b", "nope"],
    "strategy": ["ddp", "fsdp", "bogus"],
    "trainer": ["debug", "x"],
}

values = st.one_of(
    st.integers(-(2**40), 2**40).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(
        ["null", "true", "[]", "[1,2]", "[a]", "{}", "auto", "skip", "32-true", "''", "???", "${x}"]
    ),
    st.text(st.characters(codec="utf-8", exclude_categories=("Cs",), exclude_characters="\0"), max_size=12),
)
overrides = st.lists(
    st.one_of(
        st.tuples(st.sampled_from(KEYS), values).map(lambda kv: f"{kv[0]}={kv[1]}"),
        st.sampled_from(sorted(GROUPS)).flatmap(
            lambda g: st.sampled_from(GROUPS[g]).map(lambda c: f"{g}={c}")
        ),
    ),
    min_size=1,
    max_size=4,
)


@pytest.fixture(scope="module", autouse=True)
def report_outcomes() -> Iterator[None]:
    register_configs()
    yield
    print("\nfuzz outcomes:", dict(sorted(OUTCOMES.items())))


def compose_like_the_cli(args: list[str]) -> None:
    message = misspelled_override(args)
    if message:
        raise ConfigError(message)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=args)
    validate_run(to_config(cfg))


@settings(FUZZ, max_examples=150)
@given(args=overrides)
def test_fuzzed_overrides_give_a_config_or_one_clear_error(args: list[str]) -> None:
    try:
        compose_like_the_cli(args)
    except ConfigError as err:
        OUTCOMES["ConfigError"] += 1
        message = str(err)
        # The message names a key the user wrote (or the section its rule is about).
        written = {a.split("=", 1)[0] for a in args}
        mentioned = (
            written | {k.split(".")[0] for k in written} | {"finetune", "trainer", "model", "task", "data"}
        )
        assert any(k in message for k in mentioned), (args, message)
    except (HydraException, OmegaConfBaseException) as err:
        OUTCOMES[type(err).__name__] += 1  # Hydra prints these as one message and exits 1
        assert str(err).strip(), args
    else:
        OUTCOMES["valid"] += 1


@pytest.mark.slow
@pytest.mark.parametrize(
    "args",
    [
        ["trainer.max_steps=-3"],
        ["trainer.guard=maybe", "data.skip_steps=[a]"],
        ["model.n_heads=5", "model.dim=64"],
        ["trainer.max_stepz=5"],
        ["strategy=bogus"],
    ],
)
def test_the_cli_refuses_without_a_traceback(args: list[str], tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "orchestra.cli.train", f"hydra.run.dir={tmp_path / 'run'}", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        timeout=120,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode in (1, 2), out[-2000:]
    assert "Traceback" not in out, out[-2000:]
    assert not (tmp_path / "run" / "checkpoints").exists()
