"""metrics.csv survives a resume without duplicated steps; W&B runs offline and keeps one run id."""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path

import pytest

from orchestra.config import LoggerConfig, LoggerName, WandbMode
from orchestra.train.loggers import ResumableCSVLogger, wandb_mode, wandb_run_id
from tests.helpers import tiny_config


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_csv_logger_keeps_history_before_the_resumed_step(tmp_path: Path) -> None:
    first = ResumableCSVLogger(tmp_path)
    for step in range(8):
        first.log_metrics({"train/loss": 10.0 - step}, step=step)
    first.save()
    # The run died after step 7; its last checkpoint was at step 5.
    resumed = ResumableCSVLogger(tmp_path, resume_step=5)
    for step in range(5, 8):
        resumed.log_metrics({"train/loss": 100.0 + step, "val/loss": 1.0}, step=step)
    resumed.save()
    got = rows(tmp_path / "metrics.csv")
    assert [int(r["step"]) for r in got] == list(range(8))
    assert [float(r["train/loss"]) for r in got] == [10, 9, 8, 7, 6, 105, 106, 107]
    assert got[0]["val/loss"] == "" and got[-1]["val/loss"] == "1.0"


def test_wandb_mode_is_offline_without_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert wandb_mode(LoggerConfig(name=LoggerName.wandb)) == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode(LoggerConfig(name=LoggerName.wandb)) == "online"
    assert wandb_mode(LoggerConfig(name=LoggerName.wandb, wandb_mode=WandbMode.offline)) == "offline"


def test_wandb_run_id_is_created_once_per_run_dir(tmp_path: Path) -> None:
    first = wandb_run_id(tmp_path)
    assert wandb_run_id(tmp_path) == first
    assert (tmp_path / "wandb_run_id").read_text() == first


@pytest.mark.slow
def test_wandb_offline_run_continues_after_resume(
    corpus_dir: Path, data_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from orchestra.train.run import train

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("WANDB_DISABLE_CODE", "true")
    run_dir = tmp_path / "run"
    cfg = tiny_config(
        corpus_dir, data_cache, run_dir, max_steps=10, ckpt_every_n_steps=5, val_every_n_steps=5
    )
    cfg.logger = LoggerConfig(name=LoggerName.wandb)
    train(cfg)
    run_id = (run_dir / "wandb_run_id").read_text()
    cfg.trainer.max_steps = 15  # continue the same run dir for 5 more steps
    train(cfg)
    runs = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    # W&B names each attempt offline-run-<time>-<id>, adding -N when two start in the same second.
    assert len(runs) == 2 and all(
        re.fullmatch(rf"offline-run-\d{{8}}_\d{{6}}-{run_id}(-\d+)?", n) for n in runs
    ), runs
    assert os.listdir(run_dir / "wandb" / runs[-1])


def test_checkpoint_artifacts_are_refused_for_sharded_strategies(tmp_path: Path) -> None:
    from orchestra.config import ConfigError, StrategyName, TrainConfig, validate

    cfg = TrainConfig()
    cfg.trainer.devices = 2
    cfg.trainer.global_batch_size = 16
    cfg.strategy.name = StrategyName.fsdp
    cfg.logger = LoggerConfig(name=LoggerName.wandb, wandb_log_checkpoints=True)
    with pytest.raises(ConfigError, match="wandb_log_checkpoints"):
        validate(cfg)
    cfg.strategy.name = StrategyName.ddp
    validate(cfg)
