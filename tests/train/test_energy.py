"""Energy is measured once per node and summed across nodes.

Two gloo processes run the real EnergyCallback hooks. Their node identity comes from LOCAL_RANK /
NODE_RANK through Lightning's own cluster environment, and each node's meter returns readings
that are exact in binary, so the job totals can be compared with ``==``: one node with two ranks
must count the node once, two nodes must add up.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightning.fabric.plugins.environments import LightningEnvironment

from orchestra.config import EnergyConfig
from orchestra.train.callbacks.energy import CodeCarbonMeter, EnergyCallback, NodeReading, read_energy_csv

NODE_KWH = {0: 0.25, 1: 0.5}  # per reading; a node's cumulative energy after n readings is n x this
NODE_KG = {0: 0.125, 1: 0.0625}
TOKENS_PER_STEP = 100
# rank -> (node rank, local rank)
LAYOUTS = {"one_node": [(0, 0), (0, 1)], "two_nodes": [(0, 0), (1, 0)]}


class FakeMeter:
    def __init__(self, node_rank: int) -> None:
        self.node, self.readings = node_rank, 0

    def start(self) -> None:
        pass

    def read(self) -> NodeReading:
        self.readings += 1
        return NodeReading(kwh=NODE_KWH[self.node] * self.readings, kg=NODE_KG[self.node] * self.readings)

    def stop(self) -> NodeReading:
        return self.read()


class FakeModule:
    def __init__(self) -> None:
        self.logged: list[tuple[str, float]] = []

    def log(self, key: str, value: float, **kwargs: Any) -> None:
        assert kwargs.get("rank_zero_only") is True
        self.logged.append((key, value))


def _worker(rank: int, layout: str, init_file: str, out_dir: str) -> None:
    node, local = LAYOUTS[layout][rank]
    os.environ.update({"NODE_RANK": str(node), "LOCAL_RANK": str(local)})
    env = LightningEnvironment()  # what Lightning's Trainer reads node_rank / local_rank from
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        trainer = SimpleNamespace(
            local_rank=env.local_rank(),
            node_rank=env.node_rank(),
            is_global_zero=rank == 0,
            world_size=2,
            log_every_n_steps=1,
            global_step=0,
            strategy=SimpleNamespace(root_device=torch.device("cpu")),
        )
        module = FakeModule()
        built: list[int] = []

        def factory(node_rank: int) -> FakeMeter:
            built.append(node_rank)
            return FakeMeter(node_rank)

        cb = EnergyCallback(
            EnergyConfig(), Path(out_dir) / "emissions", TOKENS_PER_STEP, meter_factory=factory
        )
        cb.on_fit_start(trainer, module)  # type: ignore[arg-type]
        cb.on_train_start(trainer, module)  # type: ignore[arg-type]
        for step in (1, 2):
            trainer.global_step = step
            cb.on_train_batch_end(trainer, module, None, None, 0)  # type: ignore[arg-type]
        cb.on_fit_end(trainer, module)  # type: ignore[arg-type]
        out = {"built": built, "logged": module.logged, "result": cb.result}
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(out))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_energy_is_counted_once_per_node_and_summed_over_nodes(layout: str, tmp_path: Path) -> None:
    # fork: the children inherit the imported modules (a spawn re-imports torch and Lightning, ~5 s).
    mp.start_processes(
        _worker,
        args=(layout, str(tmp_path / "init"), str(tmp_path)),
        nprocs=2,
        join=True,
        start_method="fork",
    )
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]

    nodes = sorted({node for node, _ in LAYOUTS[layout]})
    # A meter exists only where local rank == 0: once per node.
    assert [r["built"] for r in ranks] == [[node] if local == 0 else [] for node, local in LAYOUTS[layout]]
    per_reading_kwh = sum(NODE_KWH[n] for n in nodes)
    per_reading_kg = sum(NODE_KG[n] for n in nodes)

    # Rank zero logs the job totals at each logging step; the other rank logs nothing.
    assert ranks[1]["logged"] == []
    logged = ranks[0]["logged"]
    assert [v for k, v in logged if k == "energy/kwh"] == [per_reading_kwh, 2 * per_reading_kwh]
    assert [v for k, v in logged if k == "energy/kg_co2eq"] == [per_reading_kg, 2 * per_reading_kg]
    j_per_token = [v for k, v in logged if k == "energy/j_per_token"]
    assert j_per_token == pytest.approx([n * per_reading_kwh * 3.6e6 / (n * TOKENS_PER_STEP) for n in (1, 2)])
    assert all(v >= 0 for k, v in logged if k == "energy/power_w")

    # The final reading (stop) is the third; summary numbers come from it.
    result = ranks[0]["result"]
    assert result["energy_kwh"] == 3 * per_reading_kwh
    assert result["co2_kg"] == 3 * per_reading_kg
    assert result["j_per_token"] == pytest.approx(3 * per_reading_kwh * 3.6e6 / (2 * TOKENS_PER_STEP))
    assert ranks[1]["result"]["energy_kwh"] is None

    rows = read_energy_csv(tmp_path / "energy.csv")
    assert [(r["step"], r["kwh"]) for r in rows] == [
        (1, per_reading_kwh),
        (2, 2 * per_reading_kwh),
        (2, 3 * per_reading_kwh),
    ]


def test_codecarbon_meter_gives_intermediate_readings_and_one_file_per_node(tmp_path: Path) -> None:
    meter = CodeCarbonMeter(
        EnergyConfig(country_iso_code="FRA", pue=1.5, measure_power_secs=60),
        tmp_path / "emissions",
        node_rank=3,
    )
    meter.start()
    torch.randn(512, 512) @ torch.randn(512, 512)
    first = meter.read()
    second = meter.read()
    final = meter.stop()
    assert 0 < first.kwh <= second.kwh <= final.kwh
    assert final.kg > 0
    files = list((tmp_path / "emissions").iterdir())
    assert [f.name for f in files] == ["emissions-node3.csv"]
    with open(files[0], newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1  # updated in place at every reading: one row per tracker run
    assert float(rows[0]["energy_consumed"]) == pytest.approx(final.kwh)
    assert float(rows[0]["pue"]) == 1.5 and rows[0]["country_iso_code"] == "FRA"


def _attempt(tmp_path: Path, start_step: int, end_step: int) -> tuple[EnergyCallback, FakeModule]:
    """One single-process attempt of a run from start_step to end_step, logging every step."""
    trainer = SimpleNamespace(
        local_rank=0,
        node_rank=0,
        is_global_zero=True,
        world_size=1,
        log_every_n_steps=1,
        global_step=start_step,
        strategy=SimpleNamespace(root_device=torch.device("cpu")),
    )
    module = FakeModule()
    cb = EnergyCallback(EnergyConfig(), tmp_path / "emissions", TOKENS_PER_STEP, meter_factory=FakeMeter)
    cb.on_fit_start(trainer, module)  # type: ignore[arg-type]
    cb.on_train_start(trainer, module)  # type: ignore[arg-type]
    for step in range(start_step + 1, end_step + 1):
        trainer.global_step = step
        cb.on_train_batch_end(trainer, module, None, None, 0)  # type: ignore[arg-type]
    cb.on_fit_end(trainer, module)  # type: ignore[arg-type]
    return cb, module


def test_a_resumed_run_keeps_counting_the_energy_of_earlier_attempts(tmp_path: Path) -> None:
    _attempt(tmp_path, 0, 3)  # died after step 3 (3 readings + the final one: 4 x 0.25 kWh)
    first_total = 4 * NODE_KWH[0]
    cb, module = _attempt(tmp_path, 2, 4)  # resumed from the checkpoint of step 2
    logged = [v for k, v in module.logged if k == "energy/kwh"]
    assert logged == [first_total + NODE_KWH[0], first_total + 2 * NODE_KWH[0]]
    assert cb.result["energy_kwh"] == first_total + 3 * NODE_KWH[0]
    # J/token: all energy spent (redone steps included) over the tokens the run has trained.
    assert cb.result["j_per_token"] == pytest.approx(cb.result["energy_kwh"] * 3.6e6 / (4 * TOKENS_PER_STEP))
    steps = [r["step"] for r in read_energy_csv(tmp_path / "energy.csv")]
    assert steps == [1, 2, 3, 3, 3, 4, 4]  # one history across attempts


def test_a_fresh_run_in_an_old_run_dir_starts_from_zero(tmp_path: Path) -> None:
    _attempt(tmp_path, 0, 2)
    cb, _ = _attempt(tmp_path, 0, 1)
    assert cb.result["energy_kwh"] == 2 * NODE_KWH[0]
    assert [r["step"] for r in read_energy_csv(tmp_path / "energy.csv")] == [1, 1]
