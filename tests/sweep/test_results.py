"""What a study leaves behind (orchestra.sweep.results), read back independently: trials.csv with
the csv module, study.json with json, the best trial's experiment preset composed by Hydra in a
copy of conf/ (it must give the trial's own config), and the Pareto front of a multi-objective
study against a brute-force non-dominated filter."""

from __future__ import annotations

import csv
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import optuna
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

# The sweeper module is imported before Hydra scans its plugins, as orchestra-train does (see
# test_bug_hydra_plugin_scan_imports_the_sweeper below for why that matters).
import hydra_plugins.orchestra_sweeper.sweeper  # noqa: F401
from orchestra.config import register_configs
from orchestra.sweep.results import MARKER, STUDY_FILE, TRIALS_FILE, best_trials, write_results
from orchestra.sweep.study import OVERRIDES_ATTR, RUN_DIR_ATTR, StudySettings

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"

optuna.logging.set_verbosity(optuna.logging.WARNING)

DISTRIBUTIONS = {
    "optim.lr": FloatDistribution(1e-4, 1e-2, log=True),
    "model.n_layers": IntDistribution(2, 8, step=2),
    "scheduler": CategoricalDistribution(["cosine", "wsd", "step"]),
}


@pytest.fixture(scope="module")
def conf_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of conf/, so the experiment files the tests write never reach the repository."""
    register_configs()
    target = tmp_path_factory.mktemp("conf") / "conf"
    shutil.copytree(CONF, target)
    return target


def composed(conf_dir: Path, overrides: list[str]) -> dict[str, Any]:
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            cfg = compose("config", overrides=overrides)
    finally:
        GlobalHydra.instance().clear()
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def trial_overrides(study_dir: Path, number: int, params: dict[str, Any], base: list[str]) -> list[str]:
    """A trial's override list shaped like the one the study loop gives orchestra-train."""
    sampled = [
        f"scheduler={params['scheduler']}",
        f"optim.lr={params['optim.lr']!r}",
        f"model.n_layers={params['model.n_layers']}",
    ]
    return [
        *base,
        *sampled,
        f"hydra.run.dir={study_dir}/trial-{number:04d}",
        f"trial.storage={study_dir}/study.journal",
        "trial.study=res",
        f"trial.number={number}",
        "trial.prune=true",
        "logger.group=res",
    ]


def config_part(overrides: list[str]) -> list[str]:
    """The reference filter: what makes up the config, without the study's links and folders."""
    return [o for o in overrides if not o.startswith(("hydra.", "trial.", "logger.group="))]


def comparable(cfg: dict[str, Any]) -> dict[str, Any]:
    out = dict(cfg)
    out.pop("name")  # the preset names itself <study>-best
    return out


def make_study(
    tmp_path: Path, directions: list[str], n: int, seed: int, base: list[str] | None = None
) -> tuple[Any, StudySettings]:
    rng = random.Random(seed)
    study_dir = tmp_path / "study"
    objectives = ["val_loss", "tokens_per_s", "j_per_token"][: len(directions)]
    settings = StudySettings(
        study_name="res", dir=str(study_dir), objectives=objectives, directions=directions, n_trials=n
    )
    study = optuna.create_study(directions=directions)
    for number in range(n):
        params = {
            "optim.lr": 10 ** rng.uniform(-4, -2),
            "model.n_layers": rng.choice([2, 4, 6, 8]),
            "scheduler": rng.choice(["cosine", "wsd", "step"]),
        }
        state = rng.choices([TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL], weights=[6, 2, 1])[0]
        if number == 0:
            state = TrialState.COMPLETE
        values = [round(rng.uniform(1, 5), rng.randint(0, 6)) for _ in directions]
        steps = sorted(rng.sample(range(0, 200, 10), rng.randint(1, 5)))
        user_attrs: dict[str, Any] = {
            OVERRIDES_ATTR: trial_overrides(study_dir, number, params, base or []),
            RUN_DIR_ATTR: str(study_dir / f"trial-{number:04d}"),
        }
        if state == TrialState.FAIL:
            user_attrs["failure"] = "exit code 1: boom, with a comma"
        study.add_trial(
            optuna.create_trial(
                state=state,
                values=values if state == TrialState.COMPLETE else None,
                params=params,
                distributions=DISTRIBUTIONS,
                user_attrs=user_attrs,
                intermediate_values={s: rng.uniform(1, 5) for s in steps}
                if state != TrialState.FAIL
                else None,
            )
        )
    return study, settings


def pareto_numbers(trials: list[Any], directions: list[str]) -> set[int]:
    """Brute force: a completed trial is on the front unless another is as good everywhere and better somewhere."""
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    sign = [1 if d == "minimize" else -1 for d in directions]

    def key(t: Any) -> list[float]:
        return [s * v for s, v in zip(sign, t.values, strict=True)]

    front = set()
    for t in done:
        dominated = any(
            all(a <= b for a, b in zip(key(u), key(t), strict=True)) and key(u) != key(t) for u in done
        )
        if not dominated:
            front.add(t.number)
    return front


# --------------------------------------------------------------------------- trials.csv, study.json


def test_trials_csv_agrees_with_the_trials(tmp_path: Path) -> None:
    study, settings = make_study(tmp_path, ["minimize"], 25, seed=1)
    write_results(study, settings, None)
    with open(Path(settings.dir) / TRIALS_FILE, newline="") as fh:
        rows = list(csv.DictReader(fh))
    trials = study.get_trials()
    assert len(rows) == len(trials)
    assert list(rows[0]) == [
        "number", "state", "val_loss", "model.n_layers", "optim.lr", "scheduler",
        "pruned_at_step", "duration_s", "run_dir", "failure",
    ]  # fmt: skip
    for row, t in zip(rows, trials, strict=True):
        assert int(row["number"]) == t.number
        assert row["state"] == t.state.name.lower()
        if t.state == TrialState.COMPLETE:
            assert float(row["val_loss"]) == t.value
        else:
            assert row["val_loss"] == ""
        assert float(row["optim.lr"]) == t.params["optim.lr"]  # written exactly
        assert int(row["model.n_layers"]) == t.params["model.n_layers"]
        assert row["scheduler"] == t.params["scheduler"]
        if t.state == TrialState.PRUNED:
            assert int(row["pruned_at_step"]) == max(t.intermediate_values)
        else:
            assert row["pruned_at_step"] == ""
        assert row["duration_s"] == "" or float(row["duration_s"]) >= 0
        assert row["run_dir"] == t.user_attrs[RUN_DIR_ATTR]
        assert row["failure"] == t.user_attrs.get("failure", "")


def test_study_json_counts_and_best(tmp_path: Path) -> None:
    study, settings = make_study(tmp_path, ["minimize"], 30, seed=2)
    returned = write_results(study, settings, None)
    record = json.loads((Path(settings.dir) / STUDY_FILE).read_text())
    assert record == json.loads(json.dumps(returned, default=str))
    trials = study.get_trials()
    counts: dict[str, int] = {}
    for t in trials:
        counts[t.state.name.lower()] = counts.get(t.state.name.lower(), 0) + 1
    assert record["states"] == counts
    assert record["trials"] == len(trials) == 30
    assert record["study"] == "res" and record["objectives"] == ["val_loss"]
    assert record["directions"] == ["minimize"]
    assert record["storage"] == str(Path(settings.dir) / "study.journal")
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    best = min(done, key=lambda t: t.value)  # the first of equal values, as Optuna keeps it
    assert [b["number"] for b in record["best"]] == [best.number]
    entry = record["best"][0]
    assert entry["values"] == {"val_loss": best.value}
    assert entry["params"] == best.params
    assert entry["run_dir"] == best.user_attrs[RUN_DIR_ATTR]
    assert entry["overrides"] == config_part(best.user_attrs[OVERRIDES_ATTR])
    assert record["experiment"] == str(Path(settings.dir) / "res-best.yaml")
    assert "experiment_not_written" not in record


def test_no_completed_trial_no_best(tmp_path: Path) -> None:
    settings = StudySettings(study_name="empty", dir=str(tmp_path / "s"))
    study = optuna.create_study()
    study.add_trial(optuna.create_trial(state=TrialState.FAIL, params={}, distributions={}))
    record = write_results(study, settings, None)
    assert record["best"] == [] and "experiment" not in record
    assert record["states"] == {"fail": 1}
    assert not (tmp_path / "s" / "empty-best.yaml").exists()
    with open(tmp_path / "s" / TRIALS_FILE, newline="") as fh:
        assert [r["state"] for r in csv.DictReader(fh)] == ["fail"]


# --------------------------------------------------------------------------- the best trial as an experiment


def test_best_experiment_composes_to_the_trials_config(tmp_path: Path, conf_copy: Path) -> None:
    base = [
        "model=llama-125m",
        "trainer.global_batch_size=32",
        "optim.weight_decay=0.05",
        "data.name='a b, c'",
    ]
    study, settings = make_study(tmp_path, ["minimize"], 12, seed=3, base=base)
    record = write_results(study, settings, conf_copy)
    target = conf_copy / "experiment" / "res-best.yaml"
    assert record["experiment"] == str(target)
    text = target.read_text()
    assert text == (Path(settings.dir) / "res-best.yaml").read_text()
    lines = text.splitlines()
    assert lines[0] == "# @package _global_" and MARKER in lines[1]

    best = study.best_trial
    assert f"trial {best.number} " in lines[1]
    got = composed(conf_copy, ["experiment=res-best"])
    want = composed(conf_copy, config_part(best.user_attrs[OVERRIDES_ATTR]))
    assert got["name"] == "res-best"
    assert comparable(got) == comparable(want)
    # the values themselves, and the group choices (the presets' own values come along)
    assert got["optim"]["lr"] == best.params["optim.lr"]
    assert got["optim"]["weight_decay"] == 0.05
    assert got["model"]["n_layers"] == best.params["model.n_layers"]
    assert got["model"]["name"] == "llama-125m" and got["model"]["dim"] == 768
    assert got["scheduler"]["name"] == best.params["scheduler"]
    assert got["trainer"]["global_batch_size"] == 32
    assert got["data"]["name"] == "a b, c"
    assert got["trial"]["study"] is None and got["logger"]["group"] is None


def test_best_experiment_for_every_random_trial_composes(tmp_path: Path, conf_copy: Path) -> None:
    """Whichever trial is best, its preset composes to its config (several seeds, several winners)."""
    seen = set()
    for seed in range(4):
        study, settings = make_study(tmp_path / str(seed), ["maximize"], 6, seed=10 + seed)
        settings.study_name = f"res{seed}"
        write_results(study, settings, conf_copy)
        best = study.best_trial
        seen.add((best.params["scheduler"], best.params["model.n_layers"]))
        got = composed(conf_copy, [f"experiment=res{seed}-best"])
        assert comparable(got) == comparable(
            composed(conf_copy, config_part(best.user_attrs[OVERRIDES_ATTR]))
        )
    assert len(seen) > 1


def test_hand_written_experiment_is_never_overwritten(tmp_path: Path, conf_copy: Path) -> None:
    target = conf_copy / "experiment" / "mine-best.yaml"
    hand = "# @package _global_\n# my own preset, do not touch\noptim:\n  lr: 0.5\n"
    target.write_text(hand)
    study, settings = make_study(tmp_path, ["minimize"], 5, seed=4)
    settings.study_name = "mine"
    record = write_results(study, settings, conf_copy)
    assert target.read_text() == hand
    assert str(target) in record["experiment_not_written"]
    assert record["experiment"] == str(Path(settings.dir) / "mine-best.yaml")
    assert (Path(settings.dir) / "mine-best.yaml").is_file()
    assert json.loads((Path(settings.dir) / STUDY_FILE).read_text())["experiment_not_written"]

    one_line = conf_copy / "experiment" / "short-best.yaml"
    one_line.write_text("optim: {lr: 0.5}\n")  # a file of one line has no marker line at all
    settings.study_name = "short"
    write_results(study, settings, conf_copy)
    assert one_line.read_text() == "optim: {lr: 0.5}\n"


def test_own_experiment_is_replaced(tmp_path: Path, conf_copy: Path) -> None:
    study, settings = make_study(tmp_path / "a", ["minimize"], 5, seed=5)
    settings.study_name = "again"
    write_results(study, settings, conf_copy)
    first = (conf_copy / "experiment" / "again-best.yaml").read_text()
    study2, settings2 = make_study(tmp_path / "b", ["minimize"], 5, seed=6)
    settings2.study_name = "again"
    record = write_results(study2, settings2, conf_copy)
    second = (conf_copy / "experiment" / "again-best.yaml").read_text()
    assert record["experiment"] == str(conf_copy / "experiment" / "again-best.yaml")
    assert second != first and MARKER in second.splitlines()[1]


def test_write_experiment_off_leaves_conf_alone(tmp_path: Path, conf_copy: Path) -> None:
    study, settings = make_study(tmp_path, ["minimize"], 4, seed=7)
    settings.study_name = "off"
    settings.write_experiment = False
    record = write_results(study, settings, conf_copy)
    assert not (conf_copy / "experiment" / "off-best.yaml").exists()
    assert record["experiment"] == str(Path(settings.dir) / "off-best.yaml")


# --------------------------------------------------------------------------- multi-objective


@pytest.mark.parametrize("directions", [["minimize", "maximize"], ["maximize", "minimize"], ["minimize"] * 3])
def test_pareto_front_against_brute_force(tmp_path: Path, directions: list[str]) -> None:
    for seed in range(3):
        study, settings = make_study(tmp_path / str(seed), directions, 40, seed=20 + seed)
        record = write_results(study, settings, None)
        trials = study.get_trials()
        front = pareto_numbers(trials, directions)
        assert front
        assert {t.number for t in best_trials(study)} == front
        assert {b["number"] for b in record["best"]} == front
        # the preset is the front's trial best on the first objective
        sign = 1 if directions[0] == "minimize" else -1
        first_best = min(sign * t.values[0] for t in trials if t.number in front)
        line = (Path(settings.dir) / "res-best.yaml").read_text().splitlines()[1]
        number = int(line.split("trial ")[1].split(" ")[0])
        assert number in front
        assert sign * trials[number].values[0] == first_best
        for entry in record["best"]:
            assert list(entry["values"]) == settings.objectives


# --------------------------------------------------------------------------- regressions


def test_bug_best_experiment_keeps_the_base_experiment(tmp_path: Path, conf_copy: Path) -> None:
    """conf/sweep/lr.yaml documents `orchestra-train -m experiment=debug sweep=lr`; the best
    trial ran with debug's trainer settings (max_steps 300, micro batch 16), its preset does not."""
    study, settings = make_study(tmp_path, ["minimize"], 4, seed=8, base=["experiment=debug"])
    settings.study_name = "withexp"
    write_results(study, settings, conf_copy)
    best = study.best_trial
    got = composed(conf_copy, ["experiment=withexp-best"])
    want = composed(conf_copy, config_part(best.user_attrs[OVERRIDES_ATTR]))
    assert got["trainer"] == want["trainer"]


def test_bug_best_experiment_nested_group_choice(tmp_path: Path, conf_copy: Path) -> None:
    study, settings = make_study(tmp_path, ["minimize"], 4, seed=9, base=["data/pipeline=books"])
    settings.study_name = "nested"
    write_results(study, settings, conf_copy)
    best = study.best_trial
    got = composed(conf_copy, ["experiment=nested-best"])
    want = composed(conf_copy, config_part(best.user_attrs[OVERRIDES_ATTR]))
    assert comparable(got) == comparable(want)


def test_bug_hydra_plugin_scan_imports_the_sweeper() -> None:
    """From the repository root (hydra_plugins/ on sys.path, as for `python -m orchestra.cli.eval`
    there, or any regular install), Hydra's plugin scan runs sweeper.py before it is in
    sys.modules; with `from __future__ import annotations` its @dataclass then raises
    AttributeError: 'NoneType' object has no attribute '__dict__'."""
    code = "from hydra.core.plugins import Plugins; Plugins.instance(); print('ok')"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
