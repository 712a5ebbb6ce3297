"""`sbatch slurm/sweep.sh sweep=... workers=2` on the real two-node cluster: the first job submits
an array of two workers, which share one study through its journal file and run its trials (each
a full orchestra-train) until the study has them all; some are pruned, none is lost or run twice,
and the study is consistent with every trial's own run dir."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import pytest

from tests.helpers import cli_overrides
from tests.slurm.conftest import SlurmCluster
from tests.slurm.test_slurm_pretrain import job_env  # noqa: F401 - a fixture

pytestmark = pytest.mark.slow

TRIALS = 6


def array_of(launcher_log: Path, timeout: float = 120) -> str:
    """The array id the launcher job printed."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if launcher_log.is_file():
            for line in launcher_log.read_text().splitlines():
                if "submitted 2 workers as array " in line:
                    return line.split("as array ", 1)[1].split(";")[0].split()[0]
        time.sleep(0.5)
    raise AssertionError(
        f"the launcher wrote no array id: {launcher_log.read_text() if launcher_log.exists() else ''}"
    )


def test_two_workers_share_one_study(
    slurm_cluster: SlurmCluster,
    job_env: dict[str, str],  # noqa: F811
    corpus_dir: Path,
    data_cache: Path,
    tmp_path: Path,
) -> None:
    folder = tmp_path / "study"
    overrides = cli_overrides(
        corpus_dir, data_cache, Path("unused"),
        **{"trainer.max_steps": 18, "trainer.val_every_n_steps": 6, "trainer.ckpt_every_n_steps": 18,
           "trainer.log_every_n_steps": 6, "scheduler.warmup_steps": 2},
    )  # fmt: skip
    overrides = [a for a in overrides if not a.startswith(("hydra.run.dir=", "optim.lr="))]
    args = [
        "sweep=lr",
        f"hydra.sweeper.dir={folder}",
        f"hydra.sweeper.n_trials={TRIALS}",
        "hydra.sweeper.write_experiment=false",
        "hydra.sweeper.sampler.n_startup_trials=2",
        "hydra.sweeper.pruner.options.n_startup_trials=1",
        "workers=2",
    ]
    launcher = slurm_cluster.sbatch(
        "--cpus-per-task=1", "--gpus-per-node=0", "--time=20:00", f"--output={tmp_path}/launcher.out",
        "slurm/sweep.sh", *overrides, *args, env=job_env,
    )  # fmt: skip
    info = slurm_cluster.wait(launcher, timeout=120)
    assert info["JobState"] == "COMPLETED", (tmp_path / "launcher.out").read_text()[-3000:]
    array = array_of(tmp_path / "launcher.out")
    workers = [slurm_cluster.wait(f"{array}_{i}", timeout=900) for i in range(2)]
    logs = {i: (tmp_path / f"orchestra-sweep-{array}_{i}.out") for i in range(2)}
    for i, worker in enumerate(workers):
        text = logs[i].read_text() if logs[i].exists() else "(no log)"
        assert worker["JobState"] == "COMPLETED", text[-4000:]
        assert "worker done: the study has its trials" in text
    # Both workers ran trials: the study was shared, not run twice.
    ran = {i: logs[i].read_text().count(": optim.lr=") for i in range(2)}
    assert all(n >= 1 for n in ran.values()) and sum(ran.values()) == TRIALS, ran

    record = json.loads((folder / "study.json").read_text())
    assert record["trials"] == TRIALS
    assert record["states"].get("complete", 0) + record["states"].get("pruned", 0) == TRIALS, record["states"]
    assert record["states"].get("pruned", 0) >= 1, record["states"]
    rows = list(csv.DictReader((folder / "trials.csv").read_text().splitlines()))
    assert sorted(int(r["number"]) for r in rows) == list(range(TRIALS))
    for row in rows:
        summary = json.loads((Path(row["run_dir"]) / "summary.json").read_text())
        assert summary["trial"]["number"] == int(row["number"])
        assert summary["trial"]["pruned"] == (row["state"] == "pruned")
