"""Config errors: a typo, a wrong type, an unknown preset or an impossible combination fails with a
message naming the key and what is allowed, before anything is allocated or written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from orchestra.cli.common import CONF_DIR
from orchestra.cli.train import to_config
from orchestra.config import ConfigError, TrainConfig, register_configs, validate

register_configs()
PRESETS = ["debug", "llama-125m", "llama-350m", "llama-1b", "llama-3b", "llama-8b"]


def composed(*overrides: str) -> TrainConfig:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=list(overrides))
    return to_config(cfg)


@pytest.mark.parametrize("preset", PRESETS)
def test_model_presets_compose_and_validate(preset: str) -> None:
    cfg = composed(f"model={preset}")
    assert cfg.model.name == preset
    validate(cfg)


def test_llama_8b_has_the_llama3_shape() -> None:
    m = composed("model=llama-8b").model
    assert (m.dim, m.n_layers, m.n_heads, m.n_kv_heads, m.ffn_dim, m.vocab_size) == (
        4096,
        32,
        32,
        8,
        14336,
        128256,
    )
    assert m.rope_theta == 500000.0


def test_experiment_debug_overrides_groups() -> None:
    cfg = composed("experiment=debug")
    assert cfg.name == "debug" and cfg.trainer.max_steps > 0 and cfg.model.name == "debug"


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["model.n_heads=3"], "model.dim"),
        (["model.n_kv_heads=3"], "model.n_kv_heads"),
        (["trainer.global_batch_size=12", "trainer.micro_batch_size=8"], "trainer.global_batch_size"),
        (["trainer.precision=fp8"], "trainer.precision"),
        (["energy.country_iso_code=France"], "energy.country_iso_code"),
    ],
)
def test_cross_field_errors_name_the_key(overrides: list[str], expected: str) -> None:
    with pytest.raises(ConfigError, match=expected.replace(".", r"\.")):
        validate(composed(*overrides))


def run_cli(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ORCHESTRA_RUNS": str(tmp_path / "runs"), "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(
        [sys.executable, "-m", "orchestra.cli.train", f"data.cache_dir={tmp_path / 'data'}", *overrides],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("override", "must_say"),
    [
        (
            "model.dimm=12",
            ["dimm", "did you mean model.dim?", "allowed: activation", "dim, family, ffn_dim"],
        ),  # misspelled key
        ("model.dim=wide", ["wide", "model.dim"]),  # wrong type
        ("model=llama-9b", ["llama-9b", "llama-125m"]),  # unknown preset lists what exists
        ("model.init=orthogonal", ["orthogonal", "xavier_uniform"]),  # closed choice lists values
        ("trainer.global_batch_size=10", ["trainer.global_batch_size"]),  # cross-field rule
    ],
)
def test_cli_rejects_bad_config_and_writes_nothing(
    tmp_path: Path, override: str, must_say: list[str]
) -> None:
    proc = run_cli(tmp_path, override)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    for word in must_say:
        assert word in out, out
    assert "Traceback" not in out, out
    assert not (tmp_path / "runs").exists()
    assert not (tmp_path / "data").exists()


def test_override_precheck_leaves_groups_and_hydra_alone() -> None:
    from orchestra.cli.train import misspelled_override

    fine = [
        "experiment=debug",
        "model=hf",
        "model.path=/m",
        "hydra.run.dir=x",
        "-m",
        "+extra=1",
        "~logger",
        "optim.lr=1e-3,3e-3",
        "finetune.lora_targets=[q_proj]",
        "seed=3",
        "strategy.compile=true",
    ]
    assert misspelled_override(fine) is None
    message = misspelled_override(["experiment=debug", "strategy.compil=true"])
    assert message is not None and message.startswith("strategy.compil: no key 'compil' in strategy")
    assert "did you mean strategy.compile?" in message


def test_readme_main_command_composes(tmp_path: Path) -> None:
    """`make train` runs `orchestra-train experiment=debug`: it must get past every pre-check."""
    proc = run_cli(tmp_path, "experiment=debug", "--cfg", "job")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "max_steps: 300" in proc.stdout
