"""Energy and carbon accounting with CodeCarbon.

One OfflineEmissionsTracker per node (local rank 0) measures the whole machine: several trackers
per node would count it several times. Readings go to ``<run_dir>/emissions/``. Offline mode
never touches the network; the grid's carbon intensity comes from the configured country/region.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L

from orchestra.config import EnergyConfig


class EnergyCallback(L.Callback):
    def __init__(self, cfg: EnergyConfig, output_dir: Path, tokens_per_step: int) -> None:
        self.cfg = cfg
        self.output_dir = output_dir
        self.tokens_per_step = tokens_per_step
        self.tracker: Any = None
        self.start_step = 0
        self.result: dict[str, float | None] = {"energy_kwh": None, "co2_kg": None, "j_per_token": None}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.local_rank != 0:
            return
        from codecarbon import OfflineEmissionsTracker

        # CodeCarbon logs every measurement at info level; keep the console for training.
        logging.getLogger("codecarbon").setLevel(logging.ERROR)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.tracker = OfflineEmissionsTracker(
            project_name="orchestra",
            country_iso_code=self.cfg.country_iso_code,
            region=self.cfg.region,
            pue=self.cfg.pue,
            measure_power_secs=self.cfg.measure_power_secs,
            output_dir=str(self.output_dir),
            output_file=f"emissions-node{trainer.node_rank}.csv",
            log_level="error",
            output_methods=["csv"],
            tracking_mode="machine",
        )
        self.tracker.start()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start_step = trainer.global_step

    def _stop(self, trainer: L.Trainer) -> None:
        if self.tracker is None:
            return
        tracker, self.tracker = self.tracker, None
        kg = tracker.stop()
        data = tracker.final_emissions_data
        kwh = float(data.energy_consumed) if data is not None else None
        tokens = (trainer.global_step - self.start_step) * self.tokens_per_step
        self.result = {
            "energy_kwh": kwh,
            "co2_kg": None if kg is None else float(kg),
            "j_per_token": (kwh * 3.6e6 / tokens) if kwh is not None and tokens > 0 else None,
        }

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._stop(trainer)
