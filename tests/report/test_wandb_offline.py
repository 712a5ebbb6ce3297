"""The offline W&B run holds every metric group, the resolved config, group, tags and run id.

Read back through wandb's own record schema (see wandb_records.py), not by searching the bytes.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tests.report.conftest import STEPS
from tests.report.wandb_records import finished_records, history

LOGGED = {
    "train/loss",
    "train/grad_norm",
    "val/loss",
    "val/ppl",
    "perf/tokens_per_s",
    "perf/tokens_per_s_per_device",
    "perf/tflops_per_device",
    "perf/mfu",
    "perf/hfu",
    "perf/data_wait_frac",
    "energy/kwh",
    "energy/kg_co2eq",
    "energy/j_per_token",
    "energy/power_w",
    "system/host_peak_rss_gb",
}


def test_offline_wandb_run_contains_the_logged_keys(observed_run: Path) -> None:
    files = list((observed_run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, files  # offline, one run
    records = finished_records(files[0])
    rows = history(records)
    keys = set().union(*rows)
    assert keys >= LOGGED, LOGGED - keys
    assert any(k.startswith("train/lr_") for k in keys)  # one lr per parameter group

    # The same values as the local metrics.csv (W&B gets them from the same Lightning log call).
    with open(observed_run / "metrics.csv", newline="") as f:
        local = [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]
    assert [r["train/loss"] for r in rows if "train/loss" in r] == pytest.approx(local)
    assert [r["energy/kwh"] for r in rows if "energy/kwh" in r][-1] > 0

    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run.run_id == (observed_run / "wandb_run_id").read_text().strip()
    assert run.run_group == "observability"
    assert list(run.tags) == ["model:tiny", "strategy:single", "experiment:tiny", "report", "ci"]
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["trainer"]["max_steps"] == STEPS  # the resolved config, as nested values
    assert {"model", "data", "optim", "trainer", "energy", "strategy"} <= config.keys()


def test_sweep_jobs_share_a_wandb_group(corpus_dir: Path, data_cache: Path, tmp_path: Path) -> None:
    """`orchestra-train -m ...`: every job of one Hydra sweep lands in one W&B group named after it."""
    import os
    import subprocess
    import sys

    from tests.helpers import cli_overrides

    args = [
        a
        for a in cli_overrides(
            corpus_dir,
            data_cache,
            tmp_path / "unused",
            **{
                "trainer.max_steps": 6,
                "trainer.val_every_n_steps": 6,
                "trainer.ckpt_every_n_steps": 6,
                "scheduler.warmup_steps": 1,
                "logger": "wandb",
                "optim.lr": "1e-3,3e-3",
            },
        )
        if not a.startswith("hydra.run")
    ]
    env = {**os.environ, "ORCHESTRA_RUNS": str(tmp_path / "runs"), "WANDB_MODE": "offline"}
    proc = subprocess.run(
        [sys.executable, "-m", "orchestra.cli.train", "-m", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    sweep = next((tmp_path / "runs" / "tiny").glob("multirun-*"))
    groups, ids = set(), set()
    for job in ("0", "1"):
        (wandb_file,) = (sweep / job / "wandb").glob("offline-run-*/run-*.wandb")
        run = next(r.run for r in finished_records(wandb_file) if r.WhichOneof("record_type") == "run")
        groups.add(run.run_group)
        ids.add(run.run_id)
    assert groups == {f"tiny-{sweep.name}"} and len(ids) == 2  # one group, one W&B run per job
