"""The pruning callback (orchestra.train.callbacks.pruning.TrialPruning) driven by a stand-in
Lightning trainer against a real journal storage: what it reports lands in the trial's
intermediate values, and its decision to stop is the one Optuna's own pruner gives for the same
study and trial; rank 0 alone decides and the others follow the broadcast."""

from __future__ import annotations

import random
import statistics
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from optuna.trial import TrialState

from orchestra.config import TrialConfig
from orchestra.train.callbacks.pruning import PRUNER_ATTR, TrialPruning, make_pruner, open_storage

optuna.logging.set_verbosity(optuna.logging.WARNING)

MEDIAN = {"name": "median", "n_startup_trials": 2, "n_warmup_steps": 0}


class Strategy:
    """Lightning's strategy.broadcast: rank 0's object, whatever this rank passed."""

    def __init__(self, rank0_says: Any = None) -> None:
        self.rank0_says = rank0_says
        self.calls: list[tuple[Any, int]] = []

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        self.calls.append((obj, src))
        return obj if self.rank0_says is None else self.rank0_says


class Trainer:
    def __init__(self, rank: int = 0, rank0_says: Any = None, max_steps: int = -1) -> None:
        self.is_global_zero = rank == 0
        self.max_steps = max_steps  # Lightning's default -1: no step limit
        self.sanity_checking = False
        self.callback_metrics: dict[str, Any] = {}
        self.global_step = 0
        self.strategy = Strategy(rank0_says)
        self.should_stop = False


def new_study(
    path: Path, pruner: dict[str, Any] | None, directions: tuple[str, ...] = ("minimize",)
) -> optuna.Study:
    study = optuna.create_study(study_name="p", storage=open_storage(str(path)), directions=list(directions))
    if pruner is not None:
        study.set_user_attr(PRUNER_ATTR, pruner)
    return study


def add_finished(study: optuna.Study, curves: list[dict[int, float]]) -> None:
    for curve in curves:
        study.add_trial(
            optuna.create_trial(
                value=curve[max(curve)], params={}, distributions={}, intermediate_values=curve
            )
        )


def callback_for(path: Path, number: int, **kw: Any) -> TrialPruning:
    return TrialPruning(TrialConfig(storage=str(path), study="p", number=number, **kw), path.parent)


def validate(
    cb: TrialPruning, trainer: Trainer, step: int, value: float | None, key: str = "val/loss"
) -> None:
    trainer.global_step = step
    trainer.callback_metrics = {} if value is None else {key: torch.tensor(value)}
    cb.on_validation_end(trainer, None)  # type: ignore[arg-type]


def frozen(path: Path, number: int) -> optuna.trial.FrozenTrial:
    """The trial as an independent handle on the journal sees it."""
    return optuna.load_study(study_name="p", storage=open_storage(str(path))).trials[number]


STEPS = [10, 20, 30, 40, 50]
GOOD_CURVES = [{s: 3.0 - 0.01 * s + 0.05 * i for s in STEPS} for i in range(4)]


def test_reports_go_to_the_trials_intermediate_values(tmp_path: Path) -> None:
    path = tmp_path / "study.journal"
    study = new_study(path, {"name": "none"})
    trial = study.ask()
    cb = callback_for(path, trial.number)
    trainer = Trainer()
    cb.setup(trainer, None, "fit")  # type: ignore[arg-type]
    rng = random.Random(0)
    reported = {}
    for step in STEPS:
        value = rng.uniform(1, 5)
        reported[step] = value
        validate(cb, trainer, step, value)
        assert not trainer.should_stop
    got = frozen(path, trial.number).intermediate_values
    assert got.keys() == reported.keys()
    for step, value in reported.items():
        assert got[step] == pytest.approx(value, rel=1e-6)  # through a float32 tensor
    assert cb.reported == len(STEPS)
    assert [c for c in trainer.strategy.calls] == [(False, 0)] * len(STEPS)
    assert cb.record() == {"study": "p", "number": trial.number, "monitor": "val/loss", "pruned": False,
                           "pruned_at_step": None}  # fmt: skip


def test_a_bad_trial_is_pruned_as_optunas_median_pruner_says(tmp_path: Path) -> None:
    path = tmp_path / "study.journal"
    study = new_study(path, MEDIAN)
    add_finished(study, GOOD_CURVES)
    trial = study.ask()
    cb = callback_for(path, trial.number)
    trainer = Trainer()
    cb.setup(trainer, None, "fit")  # type: ignore[arg-type]
    validate(cb, trainer, 10, 9.0)  # far worse than every finished trial at step 10

    reference = optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    loaded = optuna.load_study(study_name="p", storage=open_storage(str(path)))
    assert bool(reference.prune(loaded, frozen(path, trial.number))) is True
    median = statistics.median(c[10] for c in GOOD_CURVES)
    assert median < 9.0  # the hand-computed rule agrees
    assert trainer.should_stop is True
    assert cb.pruned_at_step == 10
    assert cb.record()["pruned"] is True and cb.record()["pruned_at_step"] == 10
    assert trainer.strategy.calls == [(True, 0)]
    # once pruned, later validations change nothing
    validate(cb, trainer, 20, 9.0)
    assert frozen(path, trial.number).intermediate_values.keys() == {10}
    assert len(trainer.strategy.calls) == 1
    # the callback stops the run; the sweeper, not the callback, marks the trial pruned
    assert frozen(path, trial.number).state == TrialState.RUNNING


def test_a_good_trial_runs_to_the_end(tmp_path: Path) -> None:
    path = tmp_path / "study.journal"
    study = new_study(path, MEDIAN)
    add_finished(study, GOOD_CURVES)
    trial = study.ask()
    cb = callback_for(path, trial.number)
    trainer = Trainer()
    cb.setup(trainer, None, "fit")  # type: ignore[arg-type]
    for step in STEPS:
        validate(cb, trainer, step, 1.0)
    assert not trainer.should_stop and cb.pruned_at_step is None
    assert len(frozen(path, trial.number).intermediate_values) == len(STEPS)


@pytest.mark.parametrize(
    "pruner",
    [
        {"name": "median", "n_startup_trials": 3, "n_warmup_steps": 25},
        {"name": "median", "n_startup_trials": 1, "n_warmup_steps": 0, "interval_steps": 20},
        {"name": "successive_halving", "min_resource": 10, "reduction_factor": 2},
        {"name": "hyperband", "min_resource": 10, "max_resource": 50, "reduction_factor": 2},
    ],
)
def test_decisions_match_optunas_pruner_step_by_step(tmp_path: Path, pruner: dict[str, Any]) -> None:
    """A twin study run by Optuna alone: the same trials, the same curves, Optuna's own pruner
    built independently from the same options; at every validation the callback stops its run
    exactly when the twin's trial.should_prune() says so (stateful pruners included: successive
    halving and Hyperband keep their rungs in the trials' system attributes)."""
    classes = {"median": optuna.pruners.MedianPruner, "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
               "hyperband": optuna.pruners.HyperbandPruner}  # fmt: skip
    options = {k: v for k, v in pruner.items() if k != "name"}
    rng = random.Random(len(str(pruner)))
    path = tmp_path / "study.journal"
    ours = new_study(path, pruner)
    twin = optuna.create_study(study_name="p", pruner=classes[pruner["name"]](**options))
    decisions = []
    for _ in range(14):
        worse = rng.uniform(0, 2)  # some trials clearly worse than the others, some not
        curve = {s: rng.uniform(1, 3) + worse for s in STEPS}
        a, b = ours.ask(), twin.ask()
        assert a.number == b.number
        cb = callback_for(path, a.number)
        trainer = Trainer()
        cb.setup(trainer, None, "fit")  # type: ignore[arg-type]
        pruned = False
        for step in STEPS:
            validate(cb, trainer, step, curve[step])
            b.report(float(torch.tensor(curve[step])), step)
            should = b.should_prune()
            assert trainer.should_stop == should, (a.number, step)
            decisions.append(should)
            if should:
                assert cb.pruned_at_step == step
                pruned = True
                break
        for study, trial in ((ours, a), (twin, b)):
            if pruned:
                study.tell(trial.number, state=TrialState.PRUNED)
            else:
                study.tell(trial.number, float(torch.tensor(curve[STEPS[-1]])))
    assert True in decisions and False in decisions  # both outcomes were checked


def test_no_pruning_at_the_last_step(tmp_path: Path) -> None:
    """At trainer.max_steps the run is over: the value is reported, the trial is not pruned."""
    path = tmp_path / "study.journal"
    study = new_study(path, MEDIAN)
    add_finished(study, GOOD_CURVES)
    trial = study.ask()
    cb = callback_for(path, trial.number)
    trainer = Trainer(max_steps=50)
    cb.setup(trainer, None, "fit")  # type: ignore[arg-type]
    validate(cb, trainer, 50, 99.0)
    reference = optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    loaded = optuna.load_study(study_name="p", storage=open_storage(str(path)))
    assert reference.prune(loaded, frozen(path, trial.number))  # Optuna alone would prune it
    assert not trainer.should_stop and cb.pruned_at_step is None
    assert frozen(path, trial.number).intermediate_values.keys() == {50}
    # one step earlier the same value is pruned
    trial2 = study.ask()
    cb2 = callback_for(path, trial2.number)
    trainer2 = Trainer(max_steps=50)
    cb2.setup(trainer2, None, "fit")  # type: ignore[arg-type]
    validate(cb2, trainer2, 40, 99.0)
    assert trainer2.should_stop and cb2.pruned_at_step == 40


def test_prune_false_reports_but_never_stops(tmp_path: Path) -> None:
    path = tmp_path / "study.journal"
    study = new_study(path, MEDIAN)
    add_finished(study, GOOD_CURVES)
    trial = study.ask()
    cb = callback_for(path, trial.number, prune=False)
    trainer = Trainer()
    cb.setup(trainer, None, "fit")  # type: ignore[arg-type]
    for step in STEPS:
        validate(cb, trainer, step, 99.0)
    assert not trainer.should_stop
    assert len(frozen(path, trial.number).intermediate_values) == len(STEPS)


def test_multi_objective_never_reports_never_prunes(tmp_path: Path) -> None:
    path = tmp_path / "study.journal"
    study = new_study(path, MEDIAN, directions=("minimize", "maximize"))
    trial = study.ask()
    cb = callback_for(path, trial.number)
    trainer = Trainer()
    cb.setup(trainer, None, "fit")  # type: ignore[arg-type]
    assert cb.multi_objective
    for step in STEPS:
        validate(cb, trainer, step, 1e9)
    assert not trainer.should_stop and cb.reported == 0
    assert frozen(path, trial.number).intermediate_values == {}
    assert trainer.strategy.calls == [(False, 0)] * len(STEPS)  # every rank still takes part


def test_other_ranks_follow_rank_zero(tmp_path: Path) -> None:
    path = tmp_path / "never" / "study.journal"
    cb = callback_for(path, 0)
    trainer = Trainer(rank=1, rank0_says=True)
    cb.setup(trainer, None, "fit")  # type: ignore[arg-type]
    assert cb.trial is None and not path.parent.exists()  # a non-zero rank never opens the storage
    validate(cb, trainer, 30, 1.0)
    assert trainer.strategy.calls == [(False, 0)]
    assert trainer.should_stop and cb.pruned_at_step == 30

    follower = callback_for(path, 0)
    trainer = Trainer(rank=3, rank0_says=False)
    follower.setup(trainer, None, "fit")  # type: ignore[arg-type]
    validate(follower, trainer, 30, 1.0)
    assert not trainer.should_stop and follower.pruned_at_step is None


def test_sanity_check_and_missing_metric(tmp_path: Path) -> None:
    path = tmp_path / "study.journal"
    study = new_study(path, MEDIAN)
    add_finished(study, GOOD_CURVES)
    trial = study.ask()
    cb = callback_for(path, trial.number)
    trainer = Trainer()
    cb.setup(trainer, None, "fit")  # type: ignore[arg-type]
    trainer.sanity_checking = True
    validate(cb, trainer, 0, 99.0)
    assert trainer.strategy.calls == [] and not trainer.should_stop
    trainer.sanity_checking = False
    validate(cb, trainer, 10, 99.0, key="train/loss")  # not the monitored metric
    assert not trainer.should_stop and cb.reported == 0
    assert trainer.strategy.calls == [(False, 0)]
    assert frozen(path, trial.number).intermediate_values == {}


def test_monitor_is_configurable(tmp_path: Path) -> None:
    path = tmp_path / "study.journal"
    study = new_study(path, {"name": "none"})
    trial = study.ask()
    cb = callback_for(path, trial.number, monitor="val/ppl")
    trainer = Trainer()
    cb.setup(trainer, None, "fit")  # type: ignore[arg-type]
    validate(cb, trainer, 10, 12.5, key="val/ppl")
    assert frozen(path, trial.number).intermediate_values == {10: 12.5}


def test_setup_twice_keeps_one_trial(tmp_path: Path) -> None:
    path = tmp_path / "study.journal"
    study = new_study(path, None)  # no pruner attribute: no pruning at all
    trial = study.ask()
    cb = callback_for(path, trial.number)
    trainer = Trainer()
    cb.setup(trainer, None, "fit")  # type: ignore[arg-type]
    first = cb.trial
    cb.setup(trainer, None, "validate")  # type: ignore[arg-type]
    assert cb.trial is first and first.number == trial.number
    validate(cb, trainer, 10, 1e9)
    assert not trainer.should_stop


# --------------------------------------------------------------------------- make_pruner


@pytest.mark.parametrize(
    ("spec", "kind"),
    [
        (None, optuna.pruners.NopPruner),
        ({}, optuna.pruners.NopPruner),
        ({"name": "none"}, optuna.pruners.NopPruner),
        ({"name": "median"}, optuna.pruners.MedianPruner),
        ({"name": "successive_halving"}, optuna.pruners.SuccessiveHalvingPruner),
        ({"name": "hyperband"}, optuna.pruners.HyperbandPruner),
    ],
)
def test_make_pruner_names(spec: dict[str, Any] | None, kind: type) -> None:
    assert type(make_pruner(spec)) is kind


def test_make_pruner_passes_options_and_keeps_the_spec() -> None:
    spec = {"name": "median", "n_startup_trials": 0, "n_warmup_steps": 15}
    pruner = make_pruner(spec)
    assert spec == {"name": "median", "n_startup_trials": 0, "n_warmup_steps": 15}
    reference = optuna.pruners.MedianPruner(n_startup_trials=0, n_warmup_steps=15)
    study = optuna.create_study(pruner=reference)
    add_finished(study, GOOD_CURVES)
    trial = study.ask()
    for step in STEPS:
        trial.report(99.0, step)
        frozen_trial = study.trials[trial.number]
        assert pruner.prune(study, frozen_trial) == reference.prune(study, frozen_trial)
    assert reference.prune(study, study.trials[trial.number])  # past the warm-up it prunes


@pytest.mark.parametrize("name", ["Median", "nop", "asha", "", "successive-halving"])
def test_make_pruner_bad_name(name: str) -> None:
    with pytest.raises(
        ValueError, match=f"pruner '{name}': choose one of none, median, successive_halving, hyperband"
    ):
        make_pruner({"name": name})


def test_make_pruner_bad_option() -> None:
    with pytest.raises(TypeError):
        make_pruner({"name": "median", "warmup": 3})
