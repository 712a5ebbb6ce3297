"""The study's storage and settings under bad input (orchestra.sweep.study): an existing study is
never overwritten, an unreadable storage is one ConfigError naming it, bad settings are refused
before a trial starts, and trials a dead worker left running are failed and queued again --
checked on real journal storages, with Optuna's own reading of the results."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from orchestra.config import ConfigError
from orchestra.sweep.space import parse_dimension, parse_space
from orchestra.sweep.study import (
    WORKER_ATTR,
    PrunerConfig,
    SamplerConfig,
    StudySettings,
    counted,
    make_sampler,
    open_study,
    recover_stale,
    retry_callback,
    worker_id,
)
from orchestra.train.callbacks.pruning import PRUNER_ATTR, open_storage

optuna.logging.set_verbosity(optuna.logging.WARNING)

DIMS = parse_space({"optim.lr": "tag(log, interval(1e-4, 1e-2))", "model.n_layers": "range(2, 9, 2)"}, None)
SPACE = {d.key: d.distribution for d in DIMS}


def settings(tmp_path: Path, **kw: object) -> StudySettings:
    s = StudySettings(study_name="bad", dir=str(tmp_path / "study"))
    for key, value in kw.items():
        setattr(s, key, value)
    return s


def journal(path: Path | str) -> optuna.storages.BaseStorage:
    """An independent handle on the same journal file."""
    return open_storage(str(path))


def snapshot(storage_path: Path, name: str) -> list[tuple[int, str, dict, object]]:
    study = optuna.load_study(study_name=name, storage=journal(storage_path))
    return [(t.number, t.state.name, t.params, t.values) for t in study.get_trials()]


# --------------------------------------------------------------------------- existing studies


def test_other_directions_refused_and_trials_untouched(tmp_path: Path) -> None:
    s = settings(tmp_path)
    study = open_study(s, DIMS)
    for value in (3.0, 2.0, 1.0):
        trial = study.ask(SPACE)
        study.tell(trial, value)
    storage_path = Path(s.storage_url())
    before = snapshot(storage_path, "bad")
    size = storage_path.stat().st_size

    other = settings(tmp_path, objectives=["val_loss", "tokens_per_s"], directions=["minimize", "maximize"])
    with pytest.raises(ConfigError) as err:
        open_study(other, DIMS)
    text = str(err.value)
    assert "'bad'" in text and str(storage_path) in text
    assert "['minimize']" in text and "['minimize', 'maximize']" in text
    assert "never overwritten" in text

    with pytest.raises(ConfigError, match="never overwritten"):
        open_study(settings(tmp_path, directions=["maximize"]), DIMS)

    assert snapshot(storage_path, "bad") == before
    assert storage_path.stat().st_size == size  # not a byte appended
    summaries = optuna.get_all_study_summaries(journal(storage_path))
    assert [(x.study_name, [d.name for d in x.directions]) for x in summaries] == [("bad", ["MINIMIZE"])]


def test_same_directions_resume_the_study(tmp_path: Path) -> None:
    s = settings(tmp_path, pruner=PrunerConfig(name="median", options={"n_startup_trials": 3}))
    study = open_study(s, DIMS)
    trial = study.ask(SPACE)
    study.tell(trial, 1.5)
    again = open_study(s, DIMS)
    assert [t.value for t in again.get_trials()] == [1.5]
    loaded = optuna.load_study(study_name="bad", storage=journal(s.storage_url()))
    assert loaded.user_attrs[PRUNER_ATTR] == {"name": "median", "n_startup_trials": 3}
    assert loaded.user_attrs["objectives"] == ["val_loss"]


def test_another_study_in_the_same_storage_is_left_alone(tmp_path: Path) -> None:
    s = settings(tmp_path)
    study = open_study(s, DIMS)
    study.tell(study.ask(SPACE), 1.0)
    other = settings(tmp_path, study_name="other", objectives=["a", "b"], directions=["maximize", "maximize"])
    open_study(other, DIMS)
    names = {
        x.study_name: len(x.directions) for x in optuna.get_all_study_summaries(journal(s.storage_url()))
    }
    assert names == {"bad": 1, "other": 2}
    assert len(snapshot(Path(s.storage_url()), "bad")) == 1


# --------------------------------------------------------------------------- unreadable storages


def test_a_directory_where_the_journal_should_be(tmp_path: Path) -> None:
    folder = tmp_path / "is-a-dir"
    folder.mkdir()
    with pytest.raises(ConfigError, match=r"hydra\.sweeper\.storage") as err:
        open_study(settings(tmp_path, storage=str(folder)), DIMS)
    assert str(folder) in str(err.value)
    assert folder.is_dir() and not any(folder.iterdir())


@pytest.mark.parametrize(
    "content",
    [
        b"hello world\nnot json\n",
        b'{"op_code": 99}\n',
        b'{"op_code": 0}\n{"op_code": 0}\n',
        b"\x00\xff\xfe\n\x01\n",
    ],
)
def test_a_garbage_journal_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "garbage.journal"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=r"hydra\.sweeper\.storage") as err:
        open_study(settings(tmp_path, storage=str(path)), DIMS)
    assert str(path) in str(err.value)
    assert path.read_bytes() == content


@pytest.mark.parametrize(
    "url",
    ["nosuchdriver://host/db", "postgresql+nosuchdbapi://user@host/db", "sqlite:////no/such/folder/x.db"],
)
def test_an_rdb_url_that_cannot_open(tmp_path: Path, url: str) -> None:
    with pytest.raises(ConfigError, match=r"hydra\.sweeper\.storage: cannot open") as err:
        open_study(settings(tmp_path, storage=url), DIMS)
    assert url in str(err.value)


def test_sqlite_storage_works(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = open_study(settings(tmp_path, storage=url), DIMS)
    study.tell(study.ask(SPACE), 0.5)
    assert optuna.load_study(study_name="bad", storage=url).best_value == 0.5


@pytest.mark.parametrize(
    "content",
    [b"hello world", b'{"op_code": 0', bytes(range(11, 256)), b"not json\n", b"\x00\xff\xfe garbage\n"],
)
def test_bug_a_journal_whose_last_line_is_garbage(tmp_path: Path, content: bytes) -> None:
    """Optuna's journal reader takes a bad last line for one still being written, so the file
    opens as an empty storage; optuna.create_study then appends its record to the garbage and
    fails re-reading it (AssertionError 'Should not reach.', JSONDecodeError, UnicodeDecodeError),
    outside open_study's try blocks, so no ConfigError names the storage."""
    path = tmp_path / "garbage.journal"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=r"hydra\.sweeper\.storage"):
        open_study(settings(tmp_path, storage=str(path)), DIMS)
    assert path.read_bytes() == content


# --------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"objectives": ["val_loss", "tokens_per_s"]}, "one per objective"),
        ({"directions": ["minimize", "maximize"]}, "one per objective"),
        ({"objectives": [], "directions": []}, "one per objective"),
        ({"directions": ["min"]}, "not minimize or maximize"),
        ({"study_name": ""}, "study_name"),
        ({"study_name": "a/b"}, "study_name"),
        ({"study_name": "a b"}, "study_name"),
        ({"n_trials": 0}, "n_trials"),
        ({"n_jobs": 0}, "n_jobs"),
        ({"max_retry": -1}, "max_retry"),
        ({"sampler": SamplerConfig(name="bayes")}, "hydra.sweeper.sampler.name: 'bayes'"),
        ({"pruner": PrunerConfig(name="patient")}, "hydra.sweeper.pruner: pruner 'patient'"),
        ({"pruner": PrunerConfig(name="median", options={"n_startup": 2})}, "hydra.sweeper.pruner"),
        ({"pruner": PrunerConfig(name="median", options={"n_startup_trials": -1})}, "hydra.sweeper.pruner"),
        ({"pruner": PrunerConfig(name="hyperband", options={"min_resources": 1})}, "hydra.sweeper.pruner"),
        (
            {"pruner": PrunerConfig(name="successive_halving", options={"bogus": True})},
            "hydra.sweeper.pruner",
        ),
    ],
)
def test_settings_validate(tmp_path: Path, changes: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        settings(tmp_path, **changes).validate()
    assert needle in str(err.value)


@pytest.mark.parametrize("name", ["tpe", "cmaes", "random", "grid"])
def test_settings_validate_good(tmp_path: Path, name: str) -> None:
    settings(tmp_path, sampler=SamplerConfig(name=name)).validate()
    settings(
        tmp_path, pruner=PrunerConfig(name="hyperband", options={"min_resource": 1, "reduction_factor": 3})
    ).validate()


def test_make_sampler_grid_refuses_intervals() -> None:
    dims = [
        parse_dimension("optim.lr", "interval(0, 1)"),
        parse_dimension("model.n_layers", "range(2, 9, 2)"),
    ]
    with pytest.raises(ConfigError, match=r"grid needs choice\(\) or range\(\).*optim\.lr"):
        make_sampler(SamplerConfig(name="grid"), dims)
    with pytest.raises(ConfigError, match=r"optim\.lr"):
        make_sampler(
            SamplerConfig(name="grid"), [parse_dimension("optim.lr", "tag(log, int, interval(1, 8))")]
        )


def test_make_sampler_grid_runs_every_point_once() -> None:
    dims = [
        parse_dimension("model.n_layers", "range(2, 9, 2)"),
        parse_dimension("scheduler", "choice(cosine, wsd)"),
    ]
    sampler = make_sampler(SamplerConfig(name="grid", seed=0), dims)
    assert isinstance(sampler, optuna.samplers.GridSampler)
    study = optuna.create_study(sampler=sampler)
    study.optimize(lambda t: float(t.suggest_int("model.n_layers", 2, 8, step=2)) if t.suggest_categorical(
        "scheduler", ["cosine", "wsd"]) else 0.0, n_trials=8)  # fmt: skip
    points = {(t.params["model.n_layers"], t.params["scheduler"]) for t in study.trials}
    assert points == {(n, s) for n in (2, 4, 6, 8) for s in ("cosine", "wsd")}


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("tpe", optuna.samplers.TPESampler),
        ("cmaes", optuna.samplers.CmaEsSampler),
        ("random", optuna.samplers.RandomSampler),
    ],
)
def test_make_sampler_kinds(name: str, kind: type) -> None:
    assert isinstance(make_sampler(SamplerConfig(name=name, seed=1), DIMS), kind)


# --------------------------------------------------------------------------- stale trials


@pytest.fixture()
def live_pid() -> int:
    """A local process that stays alive for the test."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def running(study: optuna.Study, owner: str) -> int:
    trial = study.ask(SPACE)
    trial.set_user_attr(WORKER_ATTR, owner)
    return trial.number


def test_recover_stale(tmp_path: Path, live_pid: int) -> None:
    s = settings(tmp_path)
    study = open_study(s, DIMS)
    me = worker_id()
    host = socket.gethostname()
    assert me == f"local-{host}-{os.getpid()}" or me.startswith("slurm-")
    done = study.ask(SPACE)
    study.tell(done, 1.0)
    mine = running(study, me)
    live = running(study, f"local-{host}-{live_pid}")
    gone = running(study, f"local-{host}-{dead_pid()}")
    slurm = running(study, "slurm-424242_3")  # judged by that worker itself
    other_host = running(study, f"local-elsewhere-{os.getpid()}")
    params = {n: study.trials[n].params for n in (mine, gone)}

    stale = recover_stale(study, me, max_retry=2)
    assert sorted(stale) == sorted([mine, gone])

    # read back through an independent handle on the journal
    trials = optuna.load_study(study_name="bad", storage=journal(s.storage_url())).get_trials()
    by_number = {t.number: t for t in trials}
    assert by_number[mine].state == TrialState.FAIL and by_number[gone].state == TrialState.FAIL
    for n in (live, slurm, other_host):
        assert by_number[n].state == TrialState.RUNNING
    assert by_number[done.number].state == TrialState.COMPLETE
    queued = [t for t in trials if t.state == TrialState.WAITING]
    assert sorted(t.system_attrs["failed_trial"] for t in queued) == sorted([mine, gone])
    for t in queued:
        assert t.params == params[t.system_attrs["failed_trial"]]
        assert t.system_attrs["retry_history"] == [t.system_attrs["failed_trial"]]
    # a second pass finds nothing more to do
    assert recover_stale(study, me, max_retry=2) == []


def test_recovered_trial_is_asked_again_with_its_parameters(tmp_path: Path) -> None:
    s = settings(tmp_path)
    study = open_study(s, DIMS)
    n = running(study, worker_id())
    params = study.trials[n].params
    recover_stale(study, worker_id(), max_retry=1)
    again = study.ask(SPACE)
    assert again.params == params and again.number != n


def test_counted_ignores_retried_failures(tmp_path: Path) -> None:
    s = settings(tmp_path)
    study = open_study(s, DIMS)
    me = worker_id()
    study.tell(study.ask(SPACE), 1.0)  # 1 complete: counts
    plain_fail = study.ask(SPACE)
    study.tell(plain_fail, state=TrialState.FAIL)  # a failure nobody retried: counts
    running(study, me)  # left running by this worker: retried below, so it stops counting
    running(study, "slurm-1_1")  # someone else's, still running: counts
    assert counted(study) == 4
    recover_stale(study, me, max_retry=2)
    # fail(retried) + waiting copy: the copy counts, the failure does not
    assert counted(study) == 4
    fresh = optuna.load_study(study_name="bad", storage=journal(s.storage_url()))
    assert counted(fresh) == 4
    states = sorted(t.state.name for t in fresh.get_trials())
    assert states == ["COMPLETE", "FAIL", "FAIL", "RUNNING", "WAITING"]


def test_counted_after_retries_run_out(tmp_path: Path) -> None:
    """With max_retry=1 a trial runs twice at most; the last failure is final and counts
    (read by a process that did not do the retrying)."""
    s = settings(tmp_path)
    study = open_study(s, DIMS)
    retry = retry_callback(1)
    first = study.ask(SPACE)
    study.tell(first, state=TrialState.FAIL)
    retry(study, study.trials[first.number])
    second = study.ask(SPACE)
    assert second.params == first.params
    study.tell(second, state=TrialState.FAIL)
    retry(study, study.trials[second.number])
    assert [t.state for t in study.get_trials()] == [TrialState.FAIL, TrialState.FAIL]  # no third try
    fresh = optuna.load_study(study_name="bad", storage=journal(s.storage_url()))
    assert counted(fresh) == 1


def test_bug_counted_in_the_worker_whose_retries_ran_out(tmp_path: Path) -> None:
    """recover_stale and run_trial hand Optuna's RetryHeartbeatStaleTrialCallback a trial from
    get_trials(deepcopy=False); when no retry is left the callback still appends the trial's
    number to that cached trial's retry_history, so the same worker's counted() drops the final
    failure (0 instead of 1) and asks for one trial more than n_trials."""
    s = settings(tmp_path)
    study = open_study(s, DIMS)
    me = worker_id()
    running(study, me)
    recover_stale(study, me, max_retry=1)  # FAIL #0, WAITING #1
    again = study.ask(SPACE)
    again.set_user_attr(WORKER_ATTR, me)
    recover_stale(study, me, max_retry=1)  # FAIL #1, no retry left
    assert [t.state for t in study.get_trials()] == [TrialState.FAIL, TrialState.FAIL]
    assert counted(study) == 1
