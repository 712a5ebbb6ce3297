"""`orchestra-train`: compose the Hydra config, validate it, train, print the summary.

Examples::

    orchestra-train experiment=debug
    orchestra-train model=llama-125m trainer.max_steps=2000 optim.lr=6e-4
    orchestra-train -m optim.lr=1e-4,3e-4,1e-3          # a Hydra sweep
"""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import sys
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from rich.console import Console
from rich.text import Text

from hydra_plugins.orchestra_sweeper.sweeper import ensure_registered
from orchestra.cli.common import CONF_DIR, console, fail
from orchestra.config import ConfigError, TrainConfig, register_configs
from orchestra.io import atomic_write_text


def misspelled_override(args: list[str], root: type = TrainConfig) -> str | None:
    """One message for the first ``a.b=value`` override whose key the schema lacks, listing the keys it has.

    Hydra refuses such a key too, but names only the schema class; this says what is allowed
    and what was probably meant. Undotted keys (group choices such as ``experiment=debug``,
    top-level values), ``hydra.*`` and ``+``/``~`` edits are left to Hydra.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    for arg in args:
        if arg.startswith("-") or not ("=" in arg or arg.startswith("~")):
            continue  # a flag (--cfg job) or its value: Hydra's own command line
        try:
            parsed = parser.parse_override(arg)
        except HydraException as err:  # Hydra's message does not say which override
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            return f"override `{arg}` does not parse: {first}"
        if arg.startswith(("+", "~", "hydra.")) or "=" not in arg:
            continue
        key = arg.split("=", 1)[0]
        if not key.strip():
            return f"override `{arg}`: an override needs a key before '=' (e.g. trainer.max_steps=100)"
        if "." not in key:  # a group choice (experiment=debug) or a top-level value: Hydra checks those
            group = Path(CONF_DIR) / key
            value = parsed.value()
            if group.is_dir() and not isinstance(value, (str, list)):  # Hydra raises a bare ValueError
                choices = sorted(p.stem for p in group.glob("*.yaml"))
                return f"{key}: {value!r} is not a {key} preset; choose one of {', '.join(choices)}"
            continue
        node: Any = root
        path: list[str] = []
        for part in key.split("."):
            if not is_dataclass(node):
                break
            known = {f.name: f for f in fields(node)}
            if part not in known:
                where = ".".join(path) or "the top level"
                close = difflib.get_close_matches(part, known, n=1)
                hint = f" (did you mean {'.'.join([*path, close[0]])}?)" if close else ""
                return f"{key}: no key {part!r} in {where}{hint}; allowed: {', '.join(sorted(known))}"
            path.append(part)
            node = known[part].default_factory() if callable(known[part].default_factory) else None  # type: ignore[misc]
    return None


def to_config(cfg: DictConfig) -> TrainConfig:
    """Typed config from Hydra's composition (the schema has already checked keys and types).

    Hydra's own ``hydra`` node is left out: callbacks see the config with it.
    """
    keys = [f.name for f in fields(TrainConfig) if f.name in cfg]
    try:
        typed = OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.masked_copy(cfg, keys))
        return OmegaConf.to_object(typed)  # type: ignore[return-value]
    except OmegaConfBaseException as err:  # an interpolation to a missing key or environment variable
        raise ConfigError(_omegaconf_message(err)) from None


class ValidateBeforeRun(Callback):
    """Hydra callback: cross-field validation before Hydra creates the run dir.

    Hydra calls on_run_start before it makes the output directory, so a config that cannot run
    fails here with nothing written.
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        from orchestra.train.run import validate_run

        try:
            validate_run(to_config(config))
        except ConfigError as err:
            fail(f"invalid configuration: {err}")


def _omegaconf_message(err: OmegaConfBaseException) -> str:
    """OmegaConf's message with the key it names, on one line."""
    key = getattr(err, "full_key", None)
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    return f"{key}: {text}" if key and key not in text else text


def summary_value(value: Any) -> str:
    """One summary value as text: counts with thousands separators, floats to 4 significant digits."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def summary_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """(key, text) per printed line: a nested dict (val_metrics) becomes one line per metric.

    Its metrics are named as in metrics.csv (``val/<name>``); those already printed at the top
    level (val_loss, val_ppl) are not repeated. ``run_dir`` is left to the lines after the sample.
    """
    rows: list[tuple[str, str]] = []
    for key, value in summary.items():
        if key == "run_dir":
            continue
        if isinstance(value, dict):
            prefix = "val" if key == "val_metrics" else key
            for name, inner in value.items():
                if f"{prefix}_{name}" not in summary:
                    rows.append((f"{prefix}/{name}", summary_value(inner)))
        else:
            rows.append((key, summary_value(value)))
    return rows


def print_summary(
    title: str, summary: dict[str, Any], sample: str, run_dir: Path, out: Console = console
) -> None:
    """The end-of-run summary: aligned ``key  value`` lines, the sample, where the run is.

    Plain lines rather than a table: a table fits its cells to the terminal and cuts or wraps
    the values that do not fit, and the checkpoint path is the one value a user copies. Every
    line is printed whole (soft wrap: a narrow terminal may fold it on screen, a copy is one
    line); values are not read as markup, so a path with brackets prints as it is.
    """
    rows = summary_rows(summary)
    width = max((len(key) for key, _ in rows), default=0) + 2
    out.print(Text(title, style="bold"), soft_wrap=True)
    for key, value in rows:
        out.print(Text.assemble((f"  {key:<{width}}", "bold"), value), soft_wrap=True)
    out.rule("sample")
    out.print(sample, markup=False, highlight=False)
    out.rule()
    out.print(f"run dir: {run_dir}", soft_wrap=True, markup=False, highlight=False)
    out.print(f"report:  orchestra-report {run_dir}", soft_wrap=True, markup=False, highlight=False)


register_configs()
ensure_registered()  # hydra/sweeper=orchestra (hydra_plugins/orchestra_sweeper), for -m sweep=<name>


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def _main(cfg: DictConfig) -> float | None:
    from orchestra.data.errors import DataError
    from orchestra.train.callbacks.loss_guard import DIVERGED_EXIT_CODE, TrainingDiverged
    from orchestra.train.checkpoint import CheckpointError
    from orchestra.train.run import train

    try:
        config = to_config(cfg)
    except ConfigError as err:
        fail(f"invalid configuration: {err}")
        return None
    hydra_cfg = HydraConfig.get()
    config.run_dir = hydra_cfg.runtime.output_dir
    if hydra_cfg.mode == RunMode.MULTIRUN and config.logger.group is None:
        # All jobs of one sweep share a W&B group, named after the sweep's directory.
        config.logger.group = f"{config.name}-{Path(hydra_cfg.sweep.dir).name}"
    try:
        result = train(config)
    except (ConfigError, DataError, CheckpointError) as err:
        fail(str(err))
        return None
    except TrainingDiverged as err:
        fail(str(err), code=DIVERGED_EXIT_CODE)
        return None
    if result.summary:
        print_summary(f"Orchestra run summary — {config.name}", result.summary, result.sample, result.run_dir)
    val = result.summary.get("val_loss") if result.summary else None
    return float(val) if val is not None else None  # lets Hydra sweepers optimise it


# slurm/common.sh names a file here; a run that fails for a reason a requeue cannot fix (a bad
# config, data or checkpoint, a diverged loss, a bug) writes it, so the batch script can tell that
# failure from a rank killed by a signal, whose exit status srun reports the same way.
FAIL_MARKER_ENV = "ORCHESTRA_FAIL_MARKER"
_REQUEUED_CODES = (0, 3, 4)  # done, preempted, interrupted (orchestra/train/callbacks, watchdog.py)


def _mark_failure(code: int, what: str) -> None:
    path = os.environ.get(FAIL_MARKER_ENV)
    if not path or code in _REQUEUED_CODES:
        return
    with contextlib.suppress(OSError):
        record = {
            "exit_code": code,
            "error": what[:2000],
            "rank": os.environ.get("RANK", os.environ.get("SLURM_PROCID")),
        }
        atomic_write_text(Path(path), json.dumps(record) + "\n")


def main() -> None:
    try:
        message = misspelled_override(sys.argv[1:])
        if message:
            fail(f"invalid configuration: {message}")
        _main()
    except SystemExit as err:
        code = err.code if isinstance(err.code, int) else (0 if err.code is None else 1)
        _mark_failure(code, f"exit code {code}")
        raise
    except BaseException as err:
        _mark_failure(1, f"{type(err).__name__}: {err}")
        raise


if __name__ == "__main__":
    main()
