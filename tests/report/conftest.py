"""One real tiny run with every metric group switched on: energy (CodeCarbon), W&B (offline) and
an overridden peak so MFU/HFU are logged on CPU. The report and W&B tests read it back."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestra.config import LoggerConfig, LoggerName
from tests.helpers import tiny_config

STEPS, LOG_EVERY, PEAK_FLOPS = 12, 2, 1e12


@pytest.fixture(scope="session")
def observed_run(corpus_dir: Path, data_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from orchestra.train.run import train

    run_dir = tmp_path_factory.mktemp("observed") / "run"
    with pytest.MonkeyPatch.context() as mp:
        # No W&B account: the logger must choose offline by itself and write nothing outside tmp.
        mp.delenv("WANDB_API_KEY", raising=False)
        mp.delenv("WANDB_MODE", raising=False)
        mp.setenv("HOME", str(run_dir.parent / "home"))
        mp.setenv("WANDB_DISABLE_CODE", "true")
        cfg = tiny_config(
            corpus_dir,
            data_cache,
            run_dir,
            max_steps=STEPS,
            log_every_n_steps=LOG_EVERY,
            val_every_n_steps=6,
            ckpt_every_n_steps=6,
            peak_flops=PEAK_FLOPS,
        )
        cfg.energy.enabled = True
        cfg.energy.measure_power_secs = 1.0
        cfg.logger = LoggerConfig(name=LoggerName.wandb, group="observability", tags=["report", "ci"])
        train(cfg)
    return run_dir
