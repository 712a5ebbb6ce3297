"""Helpers every bench script shares: validating a command before it trains, reading losses, CSV results.

The scripts run as files (``python bench/pretrain.py``) and put the repository root on sys.path,
so they import this as ``bench.benchlib``.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def compose_check(overrides: Sequence[str]) -> Any:
    """Compose ``overrides`` as `orchestra-train` would and run its validation; returns the TrainConfig.

    `orchestra-train --cfg job` prints the composition but skips the cross-field checks; this runs
    both (``hydra.*`` overrides left out), so a bad command fails before a GPU is touched.
    """
    from hydra import compose, initialize_config_dir

    from orchestra.cli.common import CONF_DIR
    from orchestra.cli.train import to_config
    from orchestra.config import register_configs, validate

    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = to_config(compose("config", overrides=[o for o in overrides if not o.startswith("hydra.")]))
    validate(cfg)
    return cfg


def read_losses(path: Path) -> dict[int, float]:
    """{Lightning step: train/loss} of a metrics.csv, or of a run dir's (the last row of a step wins)."""
    path = path / "metrics.csv" if path.is_dir() else path
    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        return {
            int(float(r["step"])): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")
        }


def append_csv(path: Path, fields: list[str], rows: list[dict[str, Any]]) -> None:
    """Append rows; a file written with other columns is rewritten once with the union of both."""
    path.parent.mkdir(parents=True, exist_ok=True)
    old: list[dict[str, Any]] = []
    if path.is_file():
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames and list(reader.fieldnames) != fields:
                old = list(reader)
                fields = list(dict.fromkeys([*reader.fieldnames, *fields]))
                path.unlink()
    new = not path.is_file()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerows(old + rows)
