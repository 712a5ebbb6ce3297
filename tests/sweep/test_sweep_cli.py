"""`orchestra-train -m sweep=...` end to end on CPU: a 12-trial TPE study of a tiny model's learning
rate beats the preset's default learning rate (trained the same way, outside the study), prunes
at least one trial, and leaves a study that resumes without losing a trial; bad input stops the
sweep before any trial starts."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from orchestra.config import OptimConfig
from tests.helpers import cli_overrides

pytestmark = pytest.mark.slow


def base(corpus_dir: Path, data_cache: Path) -> list[str]:
    """The tiny job, shortened; without optim.lr (the study's dimension) or a run dir (the study's)."""
    args = cli_overrides(
        corpus_dir, data_cache, Path("unused"),
        **{"trainer.max_steps": 24, "trainer.val_every_n_steps": 6, "trainer.ckpt_every_n_steps": 24,
           "trainer.log_every_n_steps": 6, "scheduler.warmup_steps": 2},
    )  # fmt: skip
    return [a for a in args if not a.startswith(("hydra.run.dir=", "optim.lr="))]


def sweep(args: list[str], timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchestra.cli.train", "-m", *args],
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def study_args(folder: Path, trials: int) -> list[str]:
    """The sweeper chosen directly, the learning rate its one dimension, on the command line."""
    return [
        "hydra/sweeper=orchestra",
        "hydra.sweeper.study_name=lr",
        f"hydra.sweeper.dir={folder}",
        f"hydra.sweeper.n_trials={trials}",
        "hydra.sweeper.write_experiment=false",
        "hydra.sweeper.sampler.seed=0",
        "hydra.sweeper.sampler.n_startup_trials=4",
        "hydra.sweeper.pruner.name=median",
        "+hydra.sweeper.pruner.options.n_startup_trials=2",
        "optim.lr=tag(log, interval(1e-4, 3e-2))",
    ]


@pytest.fixture(scope="module")
def study(corpus_dir: Path, data_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("study") / "lr"
    proc = sweep([*base(corpus_dir, data_cache), *study_args(folder, 12)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return folder


def test_the_study_beats_the_default_learning_rate_and_prunes(
    study: Path, corpus_dir: Path, data_cache: Path, tmp_path: Path
) -> None:
    record = json.loads((study / "study.json").read_text())
    assert record["trials"] == 12 and record["states"].get("pruned", 0) >= 1, record["states"]
    assert record["states"].get("complete", 0) + record["states"].get("pruned", 0) == 12
    best = record["best"][0]

    # The preset's default learning rate, trained exactly as a trial is, outside the study.
    run_dir = tmp_path / "default-lr"
    proc = subprocess.run(
        [sys.executable, "-m", "orchestra.cli.train", *base(corpus_dir, data_cache), f"hydra.run.dir={run_dir}"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:]
    default = json.loads((run_dir / "summary.json").read_text())
    assert OptimConfig().lr == pytest.approx(3e-4)
    assert best["values"]["val_loss"] < default["val_loss"] - 0.05, (best, default["val_loss"])
    assert best["params"]["optim.lr"] != pytest.approx(OptimConfig().lr)

    # Every trial is an ordinary run dir whose summary agrees with the study.
    with open(study / "trials.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 12
    for row in rows:
        summary = json.loads((Path(row["run_dir"]) / "summary.json").read_text())
        assert summary["trial"]["number"] == int(row["number"]) and summary["trial"]["study"] == "lr"
        assert summary["trial"]["pruned"] == (row["state"] == "pruned")
        if row["state"] == "complete":
            assert float(row["val_loss"]) == pytest.approx(summary["val_loss"])
        else:  # a pruned run stopped early, at a validation, and still wrote its summary
            assert summary["steps"] == int(row["pruned_at_step"]) < 24
    best_yaml = (study / "lr-best.yaml").read_text()
    assert f"lr: {best['params']['optim.lr']!r}" in best_yaml or str(best["params"]["optim.lr"]) in best_yaml

    # The report draws the study.
    report = subprocess.run([sys.executable, "-m", "orchestra.cli.report", str(study)],
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert report.returncode == 0, report.stdout + report.stderr
    for figure in ("history.png", "parallel.png", "importance.png", "intermediate.png"):
        assert (study / figure).stat().st_size > 0
    assert "## Best" in (study / "report.md").read_text()


def test_running_the_command_again_resumes_the_study(study: Path, corpus_dir: Path, data_cache: Path) -> None:
    before = json.loads((study / "study.json").read_text())
    proc = sweep([*base(corpus_dir, data_cache), *study_args(study, 14)])
    assert proc.returncode == 0, proc.stdout[-3000:]
    after = json.loads((study / "study.json").read_text())
    assert after["trials"] == 14  # the 12 kept, two more asked for
    rows = list(csv.DictReader((study / "trials.csv").read_text().splitlines()))
    assert [int(r["number"]) for r in rows] == list(range(14))
    assert before["best"][0]["values"]["val_loss"] >= after["best"][0]["values"]["val_loss"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["optim.lrr=interval(0.1, 1)"], "no key 'lrr' in optim (did you mean optim.lr?)"),
        (["optim.lr=interval(1, 0.1)"], "the interval needs start < end"),
        (["optim.lr=tag(log, interval(0, 1))"], "a log interval needs start > 0"),
        (["hydra.sweeper.sampler.name=annealing"], "is not tpe, cmaes, random or grid"),
        (["hydra.sweeper.sampler.name=grid"], "grid needs choice() or range() dimensions"),
        (["trainer.micro_batch_size=3"], "trainer.global_batch_size"),
    ],
)
def test_bad_input_is_one_error_before_any_trial(
    extra: list[str], message: str, corpus_dir: Path, data_cache: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "bad"
    proc = sweep([*base(corpus_dir, data_cache), *study_args(folder, 3), *extra], timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert message in proc.stdout and "Traceback" not in proc.stdout + proc.stderr, proc.stdout[-2000:]
    assert not list(folder.glob("trial-*"))


def test_a_missing_preset_is_hydras_one_error(corpus_dir: Path, data_cache: Path, tmp_path: Path) -> None:
    proc = sweep(
        [*base(corpus_dir, data_cache), *study_args(tmp_path / "s", 2), "model=no-such-preset"], timeout=300
    )
    assert proc.returncode == 1 and "Could not find 'model/no-such-preset'" in proc.stderr + proc.stdout
    assert not (tmp_path / "s").exists()


def test_an_existing_study_is_never_overwritten(study: Path, corpus_dir: Path, data_cache: Path) -> None:
    journal = (study / "study.journal").read_bytes()
    proc = sweep([*base(corpus_dir, data_cache), *study_args(study, 3), "hydra.sweeper.directions=[maximize]"],
                 timeout=300)  # fmt: skip
    assert proc.returncode == 2 and "is never overwritten" in proc.stdout, proc.stdout[-2000:]
    assert (study / "study.journal").read_bytes() == journal


def test_an_unreadable_storage_is_one_error(corpus_dir: Path, data_cache: Path, tmp_path: Path) -> None:
    garbage = tmp_path / "broken.journal"
    garbage.write_bytes(b"\x00\xffnot a journal\n{")
    proc = sweep([*base(corpus_dir, data_cache), *study_args(tmp_path / "s", 2), f"hydra.sweeper.storage={garbage}"],
                 timeout=300)  # fmt: skip
    assert proc.returncode == 2 and "hydra.sweeper.storage" in proc.stdout and str(garbage) in proc.stdout, (
        proc.stdout[-2000:] + proc.stderr[-2000:]
    )
