"""Hyperparameter search: an Optuna study whose trials are orchestra-train runs.

    orchestra-train -m sweep=lr                                   # the Hydra Sweeper (hydra_plugins/)
    orchestra-train -m sweep=lr hydra.sweeper.n_trials=40 'optim.weight_decay=interval(0, 0.2)'
    orchestra-sweep sweep=lr                                      # the same study, without -m (a worker)
    sbatch slurm/sweep.sh sweep=arch workers=4                    # four workers sharing the study

Both entry points parse the same overrides: sweep expressions (interval, tag(log, ...), range,
choice, comma lists) are the search space on top of ``hydra.sweeper.params``; every other
override is the base each trial takes. Results: ``<study dir>/study.json``, ``trials.csv``,
``<study>-best.yaml`` (and ``conf/experiment/<study>-best.yaml``); ``orchestra-report <study dir>``
draws the study. See docs/sweeps.md.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from orchestra.cli.common import CONF_DIR, console, fail, table
from orchestra.config import ConfigError, register_configs


def run_from_sweeper(
    settings: Any, arguments: list[str], compose: Callable[[list[str]], dict[str, Any]]
) -> dict[str, Any]:
    """Check everything, run the study, write its results and print the outcome."""
    from hydra.errors import HydraException

    from orchestra.sweep.results import write_results
    from orchestra.sweep.space import parse_space, split_arguments
    from orchestra.sweep.study import run_study, subprocess_launch

    conf = Path(CONF_DIR)
    try:
        base, space = split_arguments(arguments)
        dims = parse_space({**settings.params, **space}, conf)
        settings.validate()
        check_base(compose(base))  # a missing preset or an invalid base: one error before any trial
    except ConfigError as err:
        fail(f"invalid sweep: {err}")
    except (HydraException, OmegaConfBaseException) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        fail(f"invalid sweep: the trials' base overrides do not compose: {first}")
    console.print(
        f"[bold]study {settings.study_name}[/]: {', '.join(d.key for d in dims)}; "
        f"{settings.n_trials} trials, {settings.sampler.name} sampler, {settings.pruner.name} pruner; "
        f"storage {settings.storage_url()}",
        highlight=False,
    )
    try:
        study = run_study(
            settings, dims, base, compose, subprocess_launch(settings.launcher),
            log_line=lambda line: console.print(line, highlight=False, markup=False),
        )  # fmt: skip
    except ConfigError as err:
        fail(f"invalid sweep: {err}")
    writable = conf / "experiment"
    record = write_results(study, settings, conf if os.access(writable, os.W_OK) else None)
    print_record(record)
    return record


def check_base(composed: dict[str, Any]) -> None:
    """The config every trial starts from must be valid on its own (the run's own validation)."""
    from orchestra.cli.train import to_config
    from orchestra.train.run import validate_run

    validate_run(to_config(OmegaConf.create(composed)))


def print_record(record: dict[str, Any]) -> None:
    facts: dict[str, Any] = {
        "study": record["study"],
        "trials": ", ".join(f"{n} {k}" for k, n in record["states"].items()),
        "storage": record["storage"],
    }
    for best in record["best"][:5]:
        values = ", ".join(f"{k}={v:.4g}" for k, v in best["values"].items())
        params = ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in best["params"].items()
        )
        facts[f"best: trial {best['number']}"] = f"{values} ({params})"
    if record.get("experiment"):
        facts["experiment"] = record["experiment"]
    console.print(table("Orchestra study", facts))


def main() -> None:
    """A worker of a study, without Hydra's -m: composes the config itself, then runs the study loop."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    from hydra_plugins.orchestra_sweeper.sweeper import settings_from
    from orchestra.sweep.space import split_arguments

    register_configs()
    arguments = sys.argv[1:]
    try:
        base, _ = split_arguments(arguments)
    except ConfigError as err:
        fail(f"invalid sweep: {err}")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        try:
            cfg = compose("config", overrides=base, return_hydra_config=True)
        except (HydraException, OmegaConfBaseException) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            fail(f"invalid sweep: {first}")
        options = OmegaConf.to_container(cfg.hydra.sweeper, resolve=False)
        assert isinstance(options, dict)
        if not str(options.get("_target_", "")).endswith("OrchestraSweeper"):
            fail("invalid sweep: choose a study with sweep=<name> (conf/sweep/) or hydra/sweeper=orchestra")
        settings = settings_from({str(k): v for k, v in options.items()})

        def compose_trial(overrides: list[str]) -> dict[str, Any]:
            trial = compose("config", overrides=list(overrides))
            return OmegaConf.to_container(trial, resolve=True)  # type: ignore[return-value]

        run_from_sweeper(settings, arguments, compose_trial)


if __name__ == "__main__":
    main()
