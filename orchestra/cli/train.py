"""`orchestra-train`: compose the Hydra config, validate it, train, print the summary.

Examples::

    orchestra-train experiment=debug
    orchestra-train model=llama-125m trainer.max_steps=2000 optim.lr=6e-4
    orchestra-train -m optim.lr=1e-4,3e-4,1e-3          # a Hydra sweep
"""

from __future__ import annotations

import difflib
import sys
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from orchestra.cli.common import CONF_DIR, console, fail, table
from orchestra.config import ConfigError, TrainConfig, register_configs, validate


def misspelled_override(args: list[str], root: type = TrainConfig) -> str | None:
    """One message for the first ``a.b=value`` override whose key the schema lacks, listing the keys it has.

    Hydra refuses such a key too, but names only the schema class; this says what is allowed
    and what was probably meant. Undotted keys (group choices such as ``experiment=debug``,
    top-level values), ``hydra.*`` and ``+``/``~`` edits are left to Hydra.
    """
    for arg in args:
        if arg.startswith(("-", "+", "~", "hydra.")) or "=" not in arg:
            continue
        key = arg.split("=", 1)[0]
        if "." not in key:  # a group choice (experiment=debug) or a top-level value: Hydra checks those
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
    typed = OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.masked_copy(cfg, keys))
    return OmegaConf.to_object(typed)  # type: ignore[return-value]


class ValidateBeforeRun(Callback):
    """Hydra callback: cross-field validation before Hydra creates the run dir.

    Hydra calls on_run_start before it makes the output directory, so a config that cannot run
    fails here with nothing written.
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            validate(to_config(config))
        except ConfigError as err:
            fail(f"invalid configuration: {err}")


register_configs()


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def _main(cfg: DictConfig) -> float | None:
    from orchestra.data.errors import DataError
    from orchestra.train.checkpoint import CheckpointError
    from orchestra.train.run import train

    config = to_config(cfg)
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
    if result.summary:
        console.print(table(f"Orchestra run summary — {config.name}", result.summary))
        console.rule("sample")
        console.print(result.sample, markup=False, highlight=False)
        console.rule()
        console.print(f"run dir: {result.run_dir}", soft_wrap=True)  # paths stay on one line
        console.print(f"report:  orchestra-report {result.run_dir}", soft_wrap=True)
    val = result.summary.get("val_loss") if result.summary else None
    return float(val) if val is not None else None  # lets Hydra sweepers optimise it


def main() -> None:
    message = misspelled_override(sys.argv[1:])
    if message:
        fail(f"invalid configuration: {message}")
    _main()


if __name__ == "__main__":
    main()
