"""Energy and carbon accounting with CodeCarbon, correct on any number of nodes.

One OfflineEmissionsTracker per node, on local rank 0, measures the whole machine (GPUs through
NVML, CPU through RAPL or CodeCarbon's estimate, RAM): a tracker per rank would count the node
once per rank (codecarbon #544). At every logging step each rank contributes its node's
cumulative reading (zero on ranks that are not a node's local rank 0), one all-reduce SUM gives
the job's totals, and rank zero logs them (``energy/*``) and appends them to
``<run_dir>/energy.csv`` so the run report can plot power and energy without W&B.

Each node's own CodeCarbon file is ``<run_dir>/emissions/emissions-node<k>.csv``; offline mode
never touches the network and takes the grid's carbon intensity from the configured country or
region. A resumed job continues the totals from the last row of energy.csv: the energy spent on
steps that are redone after a crash was really spent, so it stays counted.
"""

from __future__ import annotations

import csv
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import lightning as L
import torch

from orchestra.config import EnergyConfig
from orchestra.train.callbacks.throughput import reduce_across_ranks

ENERGY_CSV = "energy.csv"
ENERGY_FIELDS = ("time", "elapsed_s", "step", "kwh", "kg_co2eq", "power_w", "j_per_token")
J_PER_KWH = 3.6e6


@dataclass
class NodeReading:
    """Cumulative energy (kWh, PUE applied) and emissions (kg CO2eq) since the meter started."""

    kwh: float = 0.0
    kg: float = 0.0


class NodeMeter(Protocol):
    """What the callback needs from a node's energy meter (CodeCarbon here, a fake in tests)."""

    def start(self) -> None: ...

    def read(self) -> NodeReading: ...

    def stop(self) -> NodeReading: ...


class CodeCarbonMeter:
    """A node's OfflineEmissionsTracker, read through CodeCarbon's public output-handler hook.

    ``flush()`` measures up to now and hands the cumulative EmissionsData to every output handler
    (the CSV file, updated in place, and the capturing handler below) while the tracker keeps
    running; ``stop()`` does the same one last time.
    """

    def __init__(self, cfg: EnergyConfig, output_dir: Path, node_rank: int) -> None:
        from codecarbon import OfflineEmissionsTracker
        from codecarbon.output_methods.base_output import BaseOutput

        class _Capture(BaseOutput):
            def __init__(self) -> None:
                self.total: Any = None

            def out(self, total: Any, delta: Any) -> None:
                self.total = total

        # CodeCarbon logs every measurement at info level; keep the console for training.
        logging.getLogger("codecarbon").setLevel(logging.ERROR)
        output_dir.mkdir(parents=True, exist_ok=True)
        self._capture = _Capture()
        self.tracker = OfflineEmissionsTracker(
            project_name="orchestra",
            country_iso_code=cfg.country_iso_code,
            region=cfg.region,
            pue=cfg.pue,
            measure_power_secs=cfg.measure_power_secs,
            output_dir=str(output_dir),
            output_file=f"emissions-node{node_rank}.csv",
            on_csv_write="update",  # one row per tracker run, rewritten at every flush
            output_handlers=[self._capture],
            log_level="error",
            output_methods=["csv"],
            tracking_mode="machine",
            api_call_interval=-1,  # handlers hear only from flush() and stop()
        )

    def _reading(self) -> NodeReading:
        total = self._capture.total
        if total is None:
            return NodeReading()
        return NodeReading(kwh=float(total.energy_consumed), kg=float(total.emissions))

    def start(self) -> None:
        self.tracker.start()

    def read(self) -> NodeReading:
        self.tracker.flush()
        return self._reading()

    def stop(self) -> NodeReading:
        self.tracker.stop()
        return self._reading()


def read_energy_csv(path: Path) -> list[dict[str, float]]:
    """Rows of an energy.csv as floats (empty when the file does not exist)."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items() if v not in (None, "")} for row in csv.DictReader(f)]


class EnergyCallback(L.Callback):
    def __init__(
        self,
        cfg: EnergyConfig,
        output_dir: Path,
        tokens_per_step: int | None,
        csv_path: Path | None = None,
        meter_factory: Callable[[int], NodeMeter] | None = None,
    ) -> None:
        """``meter_factory(node_rank)`` builds a node's meter (default: CodeCarbon into ``output_dir``).

        ``tokens_per_step=None`` (batches of varying size) leaves energy per token unreported.
        """
        self.cfg = cfg
        self.output_dir = output_dir
        self.tokens_per_step = tokens_per_step
        self.csv_path = csv_path or output_dir.parent / ENERGY_CSV
        self.meter_factory = meter_factory or (lambda node_rank: CodeCarbonMeter(cfg, output_dir, node_rank))
        self.meter: NodeMeter | None = None
        self.start_step = 0
        self.result: dict[str, float | None] = {"energy_kwh": None, "co2_kg": None, "j_per_token": None}
        self._device = torch.device("cpu")
        self._started = 0.0
        self._offset = NodeReading()  # totals of earlier attempts of this run (resume)
        self._token_base_step = 0  # tokens are counted from this step
        self._prev_time = 0.0
        self._prev_kwh = 0.0
        self._last_step = -1
        self._training = False  # energy.csv is open for rows (set in on_train_start)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._device = trainer.strategy.root_device
        self._started = self._prev_time = time.time()
        if trainer.local_rank != 0:
            return
        self.meter = self.meter_factory(trainer.node_rank)
        self.meter.start()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After checkpoint restore: global_step is the resumed step here.
        self.start_step = self._last_step = trainer.global_step
        self._training = True
        if not trainer.is_global_zero:
            return
        history = read_energy_csv(self.csv_path)
        if self.start_step > 0 and history:
            self._offset = NodeReading(kwh=history[-1]["kwh"], kg=history[-1]["kg_co2eq"])
            self._token_base_step = 0
        else:
            # A fresh run (or a resume without energy history): this attempt is the whole story.
            self._offset = NodeReading()
            self._token_base_step = self.start_step
            self.csv_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.csv_path, "w", newline="") as f:
                csv.writer(f).writerow(ENERGY_FIELDS)
        self._prev_kwh = self._offset.kwh

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == self._last_step:  # still accumulating gradients
            return
        self._last_step = step
        if step % trainer.log_every_n_steps == 0:
            totals = self._job_totals(self.meter.read() if self.meter else NodeReading())
            if trainer.is_global_zero:
                metrics = self._record(totals, step)
                for key, value in metrics.items():
                    pl_module.log(key, value, on_step=True, on_epoch=False, rank_zero_only=True)

    def _job_totals(self, node: NodeReading) -> NodeReading:
        """Sum of every node's reading: each node's local rank 0 brings its node, the rest bring zero.

        A collective: every rank calls it at the same step.
        """
        kwh, kg = reduce_across_ranks([node.kwh, node.kg], "sum", self._device)
        return NodeReading(kwh=kwh, kg=kg)

    def _record(self, totals: NodeReading, step: int) -> dict[str, float]:
        """Rank zero: the logged metrics of one reading, also appended to energy.csv."""
        now = time.time()
        kwh, kg = self._offset.kwh + totals.kwh, self._offset.kg + totals.kg
        tokens = (step - self._token_base_step) * (self.tokens_per_step or 0)
        power = (kwh - self._prev_kwh) * J_PER_KWH / max(now - self._prev_time, 1e-9)
        metrics = {"energy/kwh": kwh, "energy/kg_co2eq": kg, "energy/power_w": power}
        if tokens > 0:
            metrics["energy/j_per_token"] = kwh * J_PER_KWH / tokens
        self._prev_time, self._prev_kwh = now, kwh
        row = {
            "time": now,
            "elapsed_s": now - self._started,
            "step": step,
            "kwh": kwh,
            "kg_co2eq": kg,
            "power_w": power,
            "j_per_token": metrics.get("energy/j_per_token", ""),
        }
        with open(self.csv_path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=ENERGY_FIELDS).writerow(row)
        return metrics

    def _finish(self, trainer: L.Trainer, collective: bool) -> None:
        meter, self.meter = self.meter, None
        node = meter.stop() if meter is not None else NodeReading()
        training, self._training = self._training, False
        if not training:  # stopped before training began, or already finished
            return
        if collective:
            totals = self._job_totals(node)
        elif trainer.world_size == 1:
            totals = node
        else:
            return  # other ranks may be gone: no collective, no partial total
        if not trainer.is_global_zero:
            return
        metrics = self._record(totals, trainer.global_step)
        kwh = metrics["energy/kwh"]
        self.result = {
            "energy_kwh": kwh,
            "co2_kg": metrics["energy/kg_co2eq"],
            "j_per_token": metrics.get("energy/j_per_token"),
        }

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish(trainer, collective=True)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._finish(trainer, collective=False)
