"""The study loop: ask Optuna for a trial, run it as a full orchestra-train, tell Optuna what came out.

Every trial is its own ``orchestra-train`` process (or ``srun`` / ``torchrun`` step, through
``launcher``), so a trial can use any strategy and any number of devices, a crash or an OOM
fails one trial and not the study, and its run dir is an ordinary run dir (summary.json,
metrics.csv, checkpoints, report). The trial's result is read back from its summary.json:

    exit 0, summary.trial.pruned     PRUNED (the pruner stopped it; its last reported value stands)
    exit 0                           COMPLETE with the objectives from summary.json
    exit 3 or 4 (preempted)          FAIL, and retried with the same parameters (Optuna's RetryHeartbeatStaleTrialCallback)
    anything else                    FAIL (the exit code and the log's last line kept as user attributes)

The study lives in an Optuna storage (a journal file by default, safe on a shared filesystem),
so any number of workers -- threads here, Slurm array elements (slurm/sweep.sh) -- share it, and a
rerun of the same command resumes it: trials that were running when their worker died are
failed and retried, finished ones are kept, and asking stops once ``n_trials`` trials are
finished or running.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock

from orchestra.config import ConfigError
from orchestra.io import atomic_write_text
from orchestra.sweep.derive import DeriveConfig, derived_overrides
from orchestra.sweep.space import Dimension, as_override
from orchestra.train.callbacks.pruning import PRUNER_ATTR, make_pruner, open_storage

log = logging.getLogger(__name__)

PREEMPTED_CODES = (3, 4)  # orchestra-train: preempted after a checkpoint; interrupted (watchdog)
WORKER_ATTR = "orchestra_worker"
OVERRIDES_ATTR = "orchestra_overrides"
RUN_DIR_ATTR = "orchestra_run_dir"
SETTINGS_ATTR = "orchestra_settings"


@dataclass
class SamplerConfig:
    name: str = "tpe"
    """tpe, cmaes, random or grid."""
    seed: int | None = None
    """Seed of the sampler (a study reproduces its proposals)."""
    multivariate: bool = True
    """TPE: model the dimensions jointly."""
    n_startup_trials: int = 5
    """TPE / CMA-ES: random trials before the model proposes."""


@dataclass
class PrunerConfig:
    name: str = "median"
    """median, successive_halving, hyperband or none."""
    options: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of Optuna's pruner (median: n_startup_trials, n_warmup_steps; hyperband: min_resource, ...)."""


@dataclass
class StudySettings:
    """hydra.sweeper (conf/sweep/*.yaml): what to search, how, and where the study lives."""

    study_name: str = "sweep"
    """Name of the study in its storage; trials go to <dir>/trial-<n>/."""
    dir: str = ""
    """The study's folder; empty: sweeps/<study_name>."""
    storage: str | None = None
    """Optuna storage: a journal file path or an RDB URL; None: <dir>/study.journal."""
    objectives: list[str] = field(default_factory=lambda: ["val_loss"])
    """summary.json keys to optimise (val_loss, tokens_per_s, j_per_token, ...); two or more: a Pareto front."""
    directions: list[str] = field(default_factory=lambda: ["minimize"])
    """minimize or maximize, one per objective."""
    n_trials: int = 20
    """Trials finished or running after which no worker asks for another."""
    timeout_s: float | None = None
    """Stop asking after this many seconds (per worker)."""
    n_jobs: int = 1
    """Trials run at once by this worker."""
    max_retry: int = 2
    """Retries of a preempted trial."""
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    pruner: PrunerConfig = field(default_factory=PrunerConfig)
    params: dict[str, Any] = field(default_factory=dict)
    """The search space: {key: sweep expression}, e.g. {optim.lr: "tag(log, interval(1e-4, 1e-2))"}."""
    derive: DeriveConfig = field(default_factory=DeriveConfig)
    launcher: list[str] = field(default_factory=list)
    """Command prefix of each trial, e.g. [torchrun, --nproc-per-node=2] or [srun, --ntasks=2]."""
    write_experiment: bool = True
    """Also write the best trial as conf/experiment/<study_name>-best.yaml."""

    def folder(self) -> Path:
        return Path(self.dir or f"sweeps/{self.study_name}")

    def storage_url(self) -> str:
        return self.storage or str(self.folder() / "study.journal")

    def validate(self) -> None:
        if not self.study_name or any(c in self.study_name for c in "/\\ "):
            raise ConfigError(
                f"hydra.sweeper.study_name: {self.study_name!r} must be a non-empty name without / or spaces"
            )
        if len(self.objectives) != len(self.directions) or not self.objectives:
            raise ConfigError(
                f"hydra.sweeper.directions: one per objective ({self.objectives} vs {self.directions})"
            )
        bad = [d for d in self.directions if d not in ("minimize", "maximize")]
        if bad:
            raise ConfigError(f"hydra.sweeper.directions: {bad} are not minimize or maximize")
        if self.n_trials < 1 or self.n_jobs < 1 or self.max_retry < 0:
            raise ConfigError("hydra.sweeper: n_trials and n_jobs must be >= 1, max_retry >= 0")
        if self.sampler.name not in ("tpe", "cmaes", "random", "grid"):
            raise ConfigError(
                f"hydra.sweeper.sampler.name: {self.sampler.name!r} is not tpe, cmaes, random or grid"
            )
        try:
            make_pruner({"name": self.pruner.name, **self.pruner.options})
        except (ValueError, TypeError) as err:
            raise ConfigError(f"hydra.sweeper.pruner: {err}") from None


def make_sampler(cfg: SamplerConfig, dims: Sequence[Dimension]) -> Any:
    import optuna

    if cfg.name == "tpe":
        return optuna.samplers.TPESampler(
            seed=cfg.seed, multivariate=cfg.multivariate, n_startup_trials=cfg.n_startup_trials
        )
    if cfg.name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=cfg.seed, n_startup_trials=cfg.n_startup_trials)
    if cfg.name == "random":
        return optuna.samplers.RandomSampler(seed=cfg.seed)
    grid = {d.key: d.grid for d in dims}
    continuous = [k for k, v in grid.items() if v is None]
    if continuous:
        raise ConfigError(
            f"hydra.sweeper.sampler: grid needs choice() or range() dimensions; {continuous} are intervals"
        )
    return optuna.samplers.GridSampler(grid, seed=cfg.seed)  # type: ignore[arg-type]


def open_study(settings: StudySettings, dims: Sequence[Dimension]) -> Any:
    """Create the study, or load it when it exists with the same directions (never overwritten)."""
    import optuna

    url = settings.storage_url()
    _check_journal(url)
    try:
        storage = open_storage(url)
    except Exception as err:  # a malformed URL, a missing driver, an unwritable folder
        raise ConfigError(
            f"hydra.sweeper.storage: cannot open {url!r}: {type(err).__name__}: {err}"
        ) from None
    directions: list[Any] = list(settings.directions)
    existing = {s.study_name: s for s in _summaries(storage, url)}
    if settings.study_name in existing:
        have = [d.name.lower() for d in existing[settings.study_name].directions]
        if have != directions:
            raise ConfigError(
                f"hydra.sweeper.study_name: study {settings.study_name!r} in {url} optimises {have}, "
                f"not {directions}; choose another study_name (an existing study is never overwritten)"
            )
    try:
        study = optuna.create_study(
            study_name=settings.study_name,
            storage=storage,
            directions=directions,
            sampler=make_sampler(settings.sampler, dims),
            pruner=make_pruner({"name": settings.pruner.name, **settings.pruner.options}),
            load_if_exists=True,
        )
    except ConfigError:
        raise
    except Exception as err:
        raise ConfigError(f"hydra.sweeper.storage: cannot use {url!r}: {type(err).__name__}: {err}") from None
    study.set_user_attr(PRUNER_ATTR, {"name": settings.pruner.name, **settings.pruner.options})
    study.set_user_attr("objectives", list(settings.objectives))
    return study


def _check_journal(url: str) -> None:
    """A journal file must hold one JSON record a line; anything else is refused before Optuna
    opens it (its reader takes a bad last line for one still being written, and would append)."""
    if "://" in url:
        return
    path = Path(url)
    if path.is_dir():
        raise ConfigError(f"hydra.sweeper.storage: {url!r} is a directory, not a journal file")
    if not path.is_file() or path.stat().st_size == 0:
        return
    try:
        with open(path, "rb") as fh:
            for number, line in enumerate(fh, 1):
                if line.strip():
                    record = json.loads(line)
                    if not isinstance(record, dict) or "op_code" not in record:
                        raise ValueError(f"line {number} is not a journal record")
    except (OSError, ValueError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ConfigError(f"hydra.sweeper.storage: {url!r} is not an Optuna journal ({err})") from None


def _summaries(storage: Any, url: str) -> list[Any]:
    import optuna

    try:
        return list(optuna.get_all_study_summaries(storage, include_best_trial=False))
    except Exception as err:
        raise ConfigError(
            f"hydra.sweeper.storage: cannot read {url!r}: {type(err).__name__}: {err}"
        ) from None


# --------------------------------------------------------------------------- running trials


@dataclass
class TrialOutcome:
    returncode: int
    summary: dict[str, Any] | None
    log_tail: str


Launch = Callable[[list[str], Path], TrialOutcome]


def subprocess_launch(prefix: Sequence[str] = ()) -> Launch:
    """Each trial as ``[*prefix, python, -m, orchestra.cli.train, *overrides]``; its output to <run dir>/train.log."""

    def launch(overrides: list[str], run_dir: Path) -> TrialOutcome:
        import json

        run_dir.mkdir(parents=True, exist_ok=True)
        command = [*prefix, sys.executable, "-m", "orchestra.cli.train", *overrides]
        with open(run_dir / "train.log", "a") as out:
            out.write("$ " + " ".join(command) + "\n")
            out.flush()
            code = subprocess.call(command, stdout=out, stderr=subprocess.STDOUT)
        summary = None
        if (run_dir / "summary.json").is_file():
            try:
                summary = json.loads((run_dir / "summary.json").read_text())
            except ValueError:
                summary = None
        lines = [ln for ln in (run_dir / "train.log").read_text(errors="replace").splitlines() if ln.strip()]
        return TrialOutcome(code, summary, lines[-1] if lines else "")

    return launch


def worker_id() -> str:
    """Who runs trials: a Slurm array element (stable across its requeues) or this process."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"slurm-{array}_{task}"
    if os.environ.get("SLURM_JOB_ID"):
        return f"slurm-{os.environ['SLURM_JOB_ID']}"
    return f"local-{socket.gethostname()}-{os.getpid()}"


def _alive(worker: str) -> bool:
    """Whether a local worker's process still runs (a Slurm worker is judged by the worker itself)."""
    prefix = f"local-{socket.gethostname()}-"
    if not worker.startswith(prefix):
        return True
    try:
        os.kill(int(worker[len(prefix) :]), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def retry_callback(max_retry: int) -> Any:
    """Optuna's own retry: a copy of a failed trial, same parameters, queued (retry_history kept).

    RetryHeartbeatStaleTrialCallback is what Optuna calls on trials its heartbeat found dead;
    here it is called on trials a worker saw preempted or found left running.
    """
    import warnings

    from optuna.exceptions import ExperimentalWarning
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        return RetryHeartbeatStaleTrialCallback(max_retry=max_retry)


def recover_stale(study: Any, me: str, max_retry: int) -> list[int]:
    """Fail and retry the trials left RUNNING by a dead worker (this one, before a requeue, or a
    local process that is gone); returns their numbers."""
    from optuna.trial import TrialState

    retry = retry_callback(max_retry)
    stale = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = trial.user_attrs.get(WORKER_ATTR, "")
        if owner == me or not _alive(owner):
            study.tell(trial.number, state=TrialState.FAIL)
            retry(study, copy.deepcopy(study.get_trials(deepcopy=False)[trial.number]))
            stale.append(trial.number)
    if stale:
        log.warning("trials %s were left running by a stopped worker: failed and queued again", stale)
    return stale


def counted(study: Any) -> int:
    """Trials that use up n_trials: all but the failures that were queued again."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", ())}
    return sum(1 for t in trials if not (t.state == TrialState.FAIL and t.number in retried))


def run_study(
    settings: StudySettings,
    dims: Sequence[Dimension],
    base_overrides: Sequence[str],
    compose: Callable[[list[str]], dict[str, Any]],
    launch: Launch,
    log_line: Callable[[str], None] = print,
) -> Any:
    """Run trials until the study has ``n_trials`` (or the timeout passes); returns the study.

    ``compose(overrides)`` gives the trial's composed config as a plain dict (for the derived
    values); ``launch(overrides, run_dir)`` runs one trial.
    """
    import optuna

    settings.validate()
    folder = settings.folder().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    study = open_study(settings, dims)
    me = worker_id()
    recover_stale(study, me, settings.max_retry)
    started = time.monotonic()
    lock = threading.Lock()

    def one_worker() -> None:
        # One study object per thread: its sampler's state is not shared between threads.
        local = optuna.load_study(
            study_name=settings.study_name,
            storage=open_storage(settings.storage_url()),
            sampler=make_sampler(settings.sampler, dims),
            pruner=study.pruner,
        )
        while True:
            if settings.timeout_s is not None and time.monotonic() - started > settings.timeout_s:
                return
            # Count and ask as one step, across this worker's threads and every worker sharing the
            # study folder, so that together they never start more than n_trials.
            with lock, FileLock(str(folder / "ask.lock")):
                if counted(local) >= settings.n_trials:
                    return
                trial = local.ask({d.key: d.distribution for d in dims})
                trial.set_user_attr(WORKER_ATTR, me)
            run_trial(local, trial, settings, dims, base_overrides, compose, launch, folder, log_line)

    with ThreadPoolExecutor(max_workers=settings.n_jobs) as pool:
        for future in [pool.submit(one_worker) for _ in range(settings.n_jobs)]:
            future.result()
    return study


def trial_overrides(
    trial: Any, settings: StudySettings, dims: Sequence[Dimension], base: Sequence[str],
    compose: Callable[[list[str]], dict[str, Any]], run_dir: Path,
) -> list[str]:  # fmt: skip
    """The trial's full override list: the base, the sampled values, the derived ones, its links."""
    sampled = {d.key: trial.params[d.key] for d in dims}
    schema = [as_override(k, v) for k, v in sampled.items() if not k.startswith("arch.")]
    derived = derived_overrides(compose([*base, *schema]), sampled, settings.derive)
    return [
        *base,
        *schema,
        *(as_override(k, v) for k, v in derived.items()),
        f"hydra.run.dir={run_dir}",
        f"trial.storage={as_override('x', settings.storage_url()).split('=', 1)[1]}",
        f"trial.study={settings.study_name}",
        f"trial.number={trial.number}",
        f"trial.prune={str(len(settings.objectives) == 1).lower()}",
        f"logger.group={settings.study_name}",
    ]


def run_trial(
    study: Any, trial: Any, settings: StudySettings, dims: Sequence[Dimension], base: Sequence[str],
    compose: Callable[[list[str]], dict[str, Any]], launch: Launch, folder: Path, log_line: Callable[[str], None],
) -> None:  # fmt: skip
    from optuna.trial import TrialState

    run_dir = folder / f"trial-{trial.number:04d}"
    try:
        overrides = trial_overrides(trial, settings, dims, base, compose, run_dir)
    except ConfigError as err:
        trial.set_user_attr("failure", str(err))
        study.tell(trial, state=TrialState.FAIL)
        log_line(f"trial {trial.number}: failed before it started: {err}")
        return
    trial.set_user_attr(OVERRIDES_ATTR, overrides)
    trial.set_user_attr(RUN_DIR_ATTR, str(run_dir))
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "overrides.txt", "\n".join(overrides) + "\n")
    params = ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.params.items()
    )
    log_line(f"trial {trial.number}: {params}")
    outcome = launch(overrides, run_dir)
    summary = outcome.summary or {}
    if outcome.returncode == 0 and (summary.get("trial") or {}).get("pruned"):
        study.tell(trial, state=TrialState.PRUNED)
        log_line(f"trial {trial.number}: pruned at step {summary['trial']['pruned_at_step']}")
        return
    if outcome.returncode == 0:
        values = [summary.get(name) for name in settings.objectives]
        if all(isinstance(v, int | float) for v in values):
            study.tell(trial, values=[float(v) for v in values])  # type: ignore[arg-type]
            shown = ", ".join(f"{n}={v:.4g}" for n, v in zip(settings.objectives, values, strict=True))
            log_line(f"trial {trial.number}: {shown}")
            return
        missing = [
            n for n, v in zip(settings.objectives, values, strict=True) if not isinstance(v, int | float)
        ]
        reason = f"summary.json has no value for {missing}"
    else:
        reason = f"exit code {outcome.returncode}: {outcome.log_tail[-500:]}"
    trial.set_user_attr("failure", reason)
    trial.set_user_attr("exit_code", outcome.returncode)
    study.tell(trial, state=TrialState.FAIL)
    if outcome.returncode in PREEMPTED_CODES:
        retry_callback(settings.max_retry)(
            study, copy.deepcopy(study.get_trials(deepcopy=False)[trial.number])
        )
        log_line(f"trial {trial.number}: preempted; queued again with the same parameters")
    else:
        log_line(f"trial {trial.number}: failed ({reason})")
