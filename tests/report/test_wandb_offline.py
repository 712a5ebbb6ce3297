"""The offline W&B run holds every metric group, the resolved config, group, tags and run id.

Read back through wandb's own record schema (see wandb_records.py), not by searching the bytes.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tests.report.conftest import STEPS
from tests.report.wandb_records import history, read_records

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
    records = list(read_records(files[0]))
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
