"""What a study leaves in its folder: study.json, trials.csv and the best trial as an experiment.

    <dir>/study.json               name, storage, objectives, counts by state, best trial(s) with
                                   their parameters, overrides and run dirs
    <dir>/trials.csv               one row per trial: number, state, values, parameters, run dir
    <dir>/<study>-best.yaml        the best trial's config as an experiment preset (also written
                                   to conf/experiment/ when write_experiment is set), so
                                   ``orchestra-train experiment=<study>-best`` trains it again
    <dir>/trial-<n>/               each trial's run dir (summary.json, metrics.csv, train.log, ...)

For a multi-objective study "best" is the Pareto front; the experiment file is written for the
front's trial that is best on the first objective.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from orchestra.io import atomic_write_text
from orchestra.sweep.study import OVERRIDES_ATTR, RUN_DIR_ATTR, StudySettings

STUDY_FILE = "study.json"
TRIALS_FILE = "trials.csv"
MARKER = "# Written by the orchestra sweeper from study"
# Overrides that link a run to its study or its folder: not part of a reusable experiment.
_NOT_CONFIG = ("hydra.", "trial.", "logger.group=", "sweep=", "+sweep=")


def best_trials(study: Any) -> list[Any]:
    from optuna.trial import TrialState

    if not any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
        return []
    return list(study.best_trials) if len(study.directions) > 1 else [study.best_trial]


def study_record(study: Any, settings: StudySettings) -> dict[str, Any]:
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    states = {s.name.lower(): sum(1 for t in trials if t.state == s) for s in TrialState}
    best = best_trials(study)
    return {
        "study": settings.study_name,
        "storage": settings.storage_url(),
        "objectives": list(settings.objectives),
        "directions": list(settings.directions),
        "sampler": settings.sampler.name,
        "pruner": settings.pruner.name,
        "n_trials": settings.n_trials,
        "trials": len(trials),
        "states": {k: v for k, v in states.items() if v},
        "best": [_trial_entry(t, settings) for t in best],
    }


def _trial_entry(t: Any, settings: StudySettings) -> dict[str, Any]:
    return {
        "number": t.number,
        "values": dict(zip(settings.objectives, t.values or [], strict=False)),
        "params": t.params,
        "run_dir": t.user_attrs.get(RUN_DIR_ATTR),
        "overrides": experiment_overrides(t.user_attrs.get(OVERRIDES_ATTR, [])),
    }


def experiment_overrides(overrides: list[str]) -> list[str]:
    """The overrides that make up the trial's config (its study links and folders left out)."""
    return [o for o in overrides if not o.startswith(_NOT_CONFIG)]


def write_trials_csv(study: Any, settings: StudySettings, path: Path) -> None:
    trials = study.get_trials(deepcopy=False)
    params = sorted({k for t in trials for k in t.params})
    header = [
        "number",
        "state",
        *settings.objectives,
        *params,
        "pruned_at_step",
        "duration_s",
        "run_dir",
        "failure",
    ]
    rows = []
    for t in trials:
        values = list(t.values or [None] * len(settings.objectives))
        last_step = max(t.intermediate_values) if t.intermediate_values else None
        rows.append([
            t.number, t.state.name.lower(), *values, *(t.params.get(k) for k in params),
            last_step if t.state.name == "PRUNED" else None,
            round(t.duration.total_seconds(), 2) if t.duration else None,
            t.user_attrs.get(RUN_DIR_ATTR), t.user_attrs.get("failure"),
        ])  # fmt: skip
    # Workers of one study write this file at once: atomic_write_text gives each its own temp name.
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write_text(path, text.getvalue())


def experiment_yaml(
    study_name: str, trial: Any, objectives: list[str], overrides: list[str], groups: set[str]
) -> str:
    """The trial's overrides as a ``# @package _global_`` experiment preset (``groups``: the config
    groups, whose choices become ``defaults`` entries)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    parser = OverridesParser.create()
    chosen: list[str] = []
    included: list[str] = []
    values = OmegaConf.create({})
    for text in overrides:
        o = parser.parse_override(text)
        key, value = o.key_or_group, o.value()
        if key == "experiment" and isinstance(value, str):
            # The experiment the trial started from comes first; this preset's values then win.
            included.append(f"  - /experiment/{value}")
        elif key in groups and not isinstance(value, dict | list):
            chosen.append(f"  - override /{key}: {value}")
        else:
            OmegaConf.update(values, key.lstrip("+"), value, force_add=True)
    OmegaConf.update(values, "name", f"{study_name}-best", force_add=True)
    shown = ", ".join(f"{n}={v:.6g}" for n, v in zip(objectives, trial.values or [], strict=False))
    lines = [
        "# @package _global_",
        f"{MARKER} {study_name!r}: trial {trial.number} ({shown}).",
        f"#   orchestra-train experiment={study_name}-best",
    ]
    if chosen or included:
        # Overrides must end a defaults list; _self_ after the included experiment, so ours win.
        lines += ["defaults:", *included, "  - _self_", *chosen]
    body = OmegaConf.to_yaml(values).strip()
    if body and body != "{}":
        lines.append(body)
    return "\n".join(lines) + "\n"


def write_results(study: Any, settings: StudySettings, conf_dir: Path | None) -> dict[str, Any]:
    """study.json, trials.csv and the best trial's experiment file; returns the study record."""
    folder = settings.folder()
    folder.mkdir(parents=True, exist_ok=True)
    groups = _groups(conf_dir) if conf_dir is not None else set()
    record = study_record(study, settings)
    write_trials_csv(study, settings, folder / TRIALS_FILE)
    best = best_trials(study)
    if best:
        first = min(best, key=lambda t: t.values[0] if settings.directions[0] == "minimize" else -t.values[0])
        text = experiment_yaml(settings.study_name, first, settings.objectives,
                               experiment_overrides(first.user_attrs.get(OVERRIDES_ATTR, [])), groups)  # fmt: skip
        atomic_write_text(folder / f"{settings.study_name}-best.yaml", text)
        record["experiment"] = str(folder / f"{settings.study_name}-best.yaml")
        if settings.write_experiment and conf_dir is not None:
            target = conf_dir / "experiment" / f"{settings.study_name}-best.yaml"
            if _ours_or_absent(target):
                atomic_write_text(target, text)
                record["experiment"] = str(target)
            else:
                record["experiment_not_written"] = f"{target} exists and was not written by a sweep"
    atomic_write_text(folder / STUDY_FILE, json.dumps(record, indent=2, default=str) + "\n")
    return record


def _groups(conf_dir: Path) -> set[str]:
    """Every config group under conf/, nested ones (data/pipeline) included."""
    return {
        p.relative_to(conf_dir).as_posix()
        for p in conf_dir.rglob("*")
        if p.is_dir() and any(p.glob("*.yaml"))
    }


def _ours_or_absent(path: Path) -> bool:
    """Never overwrite an experiment file a person wrote: only one this module wrote before."""
    if not path.exists():
        return True
    try:
        return MARKER in path.read_text().splitlines()[1]
    except (OSError, IndexError):
        return False
