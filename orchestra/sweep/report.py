"""A study's report: ``orchestra-report <study dir>`` writes report.md and Optuna's own plots.

    history.png        the objective of every trial in order, and the best so far
    importance.png     parameter importances (Optuna's default evaluator) of the completed trials
    parallel.png       parallel coordinates: each trial's parameters and objective
    pareto.png         the Pareto front (two or three objectives)
    intermediate.png   the pruner's view: every trial's reported val/loss by step

The study is read from its storage (named in study.json), so the report is current even while
workers run. A plot that the study cannot support yet (importances before two completed trials,
a Pareto front of one objective) is left out with one line saying why.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from orchestra.io import atomic_write_text
from orchestra.sweep.results import STUDY_FILE, TRIALS_FILE
from orchestra.train.callbacks.pruning import open_storage

REPORT_NAME = "report.md"


class StudyReportError(ValueError):
    """A folder that is not a study's, or a study that cannot be read; the message says which."""


def is_study_dir(path: Path) -> bool:
    return (Path(path) / STUDY_FILE).is_file()


def load(study_dir: Path) -> tuple[dict[str, Any], Any]:
    import optuna

    path = Path(study_dir) / STUDY_FILE
    try:
        record = json.loads(path.read_text())
        name, storage = record["study"], record["storage"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise StudyReportError(f"{path}: not a readable study record ({type(err).__name__}: {err})") from None
    try:
        study = optuna.load_study(study_name=name, storage=open_storage(storage))
    except Exception as err:
        raise StudyReportError(
            f"study {name!r} in {storage}: cannot be loaded ({type(err).__name__}: {err})"
        ) from None
    return record, study


def figures(study: Any, objectives: list[str]) -> tuple[dict[str, Any], list[str]]:
    """Optuna's matplotlib plots of ``study`` by file name, and a line for each plot left out."""
    from optuna.exceptions import ExperimentalWarning
    from optuna.trial import TrialState
    from optuna.visualization import matplotlib as vis

    done = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    multi = len(study.directions) > 1
    plots: dict[str, Callable[[], Any]] = {}
    skipped: list[str] = []
    target = None if not multi else (lambda t: t.values[0])
    name = objectives[0] if objectives else "objective"
    if done:
        plots["history.png"] = lambda: vis.plot_optimization_history(study, target=target, target_name=name)
        plots["parallel.png"] = lambda: vis.plot_parallel_coordinate(study, target=target, target_name=name)
    else:
        skipped.append("no trial has completed yet: no history or parallel coordinates")
    varied = {k for t in done for k in t.params if len({str(u.params.get(k)) for u in done}) > 1}
    if len(done) >= 2 and varied:
        plots["importance.png"] = lambda: vis.plot_param_importances(study, target=target, target_name=name)
    else:
        skipped.append("parameter importances need two completed trials that differ")
    if multi and done and len(study.directions) <= 3:
        plots["pareto.png"] = lambda: vis.plot_pareto_front(study, target_names=objectives)
    if any(t.intermediate_values for t in study.get_trials(deepcopy=False)):
        plots["intermediate.png"] = lambda: vis.plot_intermediate_values(study)
    out = {}
    for file, draw in plots.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            try:
                axes = draw()
            except (ValueError, RuntimeError) as err:
                skipped.append(f"{file}: {err}")
                continue
        ax = axes.flat[0] if hasattr(axes, "flat") else axes
        out[file] = ax.figure
    return out, skipped


def write_study_report(study_dir: Path) -> tuple[Path, list[str]]:
    """report.md and the plots in ``study_dir``; returns the report's path and the figure files."""
    import matplotlib

    matplotlib.use("Agg")
    from optuna.trial import TrialState

    study_dir = Path(study_dir)
    record, study = load(study_dir)
    objectives = list(record.get("objectives") or ["objective"])
    figs, skipped = figures(study, objectives)
    trials = study.get_trials(deepcopy=False)
    lines = [f"# Study report — {record['study']}", ""]
    states = {s.name.lower(): sum(1 for t in trials if t.state == s) for s in TrialState}
    lines += ["| | |", "|---|---|"]
    lines += [
        f"| storage | `{record['storage']}` |",
        f"| objectives | {', '.join(f'{o} ({d})' for o, d in zip(objectives, record.get('directions', []), strict=False))} |",
        f"| sampler / pruner | {record.get('sampler')} / {record.get('pruner')} |",
        f"| trials | {', '.join(f'{n} {k}' for k, n in states.items() if n)} |",
    ]
    best = [t for t in trials if t.state == TrialState.COMPLETE]
    if best:
        front = list(study.best_trials) if len(study.directions) > 1 else [study.best_trial]
        lines += [
            "",
            "## Best" + (" (Pareto front)" if len(front) > 1 or len(study.directions) > 1 else ""),
            "",
        ]
        params = sorted({k for t in front for k in t.params})
        lines += [
            "| trial | " + " | ".join(objectives + params) + " |",
            "|---" * (1 + len(objectives) + len(params)) + "|",
        ]
        for t in front:
            cells = [f"{v:.6g}" for v in t.values] + [_cell(t.params.get(k)) for k in params]
            lines.append(f"| {t.number} | " + " | ".join(cells) + " |")
        if record.get("experiment"):
            lines += ["", f"Train the best again: `orchestra-train experiment={record['study']}-best` "
                          f"(`{record['experiment']}`)."]  # fmt: skip
    for file, fig in figs.items():
        fig.savefig(study_dir / file, dpi=110, bbox_inches="tight")
        lines += ["", f"![{file[:-4]}]({file})"]
    if skipped:
        lines += [""] + [f"- left out: {why}" for why in skipped]
    lines += [
        "",
        f"Every trial: `{TRIALS_FILE}`; each trial's run dir is `trial-<n>/` (its own `orchestra-report`).",
        "",
    ]
    path = study_dir / REPORT_NAME
    atomic_write_text(path, "\n".join(lines))  # its own temp name: workers may write it at once
    return path, list(figs)


def _cell(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
