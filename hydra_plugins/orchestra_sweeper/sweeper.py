"""``orchestra-train -m sweep=<name>``: a Hydra Sweeper that runs an Optuna study of orchestra-train trials.

Hydra finds this module in the ``hydra_plugins`` namespace package and registers its config as
``hydra/sweeper: orchestra`` (conf/sweep/*.yaml select it). Written here rather than taken from
hydra-optuna-sweeper 1.3, which pins optuna < 3 (its sqlite storage breaks under SQLAlchemy 2)
and has no pruning. The Sweeper itself is thin: it splits Hydra's overrides into the search space
(sweep expressions such as ``optim.lr=tag(log, interval(1e-4, 1e-2))``, plus
``hydra.sweeper.params``) and the base every trial shares, and hands both to
:func:`orchestra.sweep.study.run_study`, which runs each trial as its own orchestra-train process.
"""

# No ``from __future__ import annotations``: Hydra's plugin scan executes this module before it is
# in sys.modules, and a dataclass with string annotations looks its module up there.
from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from orchestra.sweep.study import StudySettings


@dataclass
class OrchestraSweeperConf(StudySettings):
    _target_: str = "hydra_plugins.orchestra_sweeper.sweeper.OrchestraSweeper"


ConfigStore.instance().store(
    group="hydra/sweeper", name="orchestra", node=OrchestraSweeperConf, provider="orchestra"
)


def settings_from(options: dict[str, Any]) -> StudySettings:
    """hydra.sweeper's values (as Hydra passes them to the constructor) as StudySettings."""
    plain = {k: (OmegaConf.to_container(v, resolve=True) if isinstance(v, DictConfig) else v)
             for k, v in options.items() if k != "_target_"}  # fmt: skip
    merged = OmegaConf.merge(OmegaConf.structured(StudySettings), plain)
    settings: StudySettings = OmegaConf.to_object(merged)  # type: ignore[assignment]
    return settings


class OrchestraSweeper(Sweeper):
    def __init__(self, **options: Any) -> None:
        self.settings = settings_from(options)
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context = hydra_context
        self.config = config

    def compose(self, overrides: list[str]) -> dict[str, Any]:
        """The trial's config as a plain dict, composed the way its own process will compose it."""
        assert self.hydra_context is not None and self.config is not None
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        keys = [str(k) for k in cfg if k != "hydra"]
        return OmegaConf.to_container(OmegaConf.masked_copy(cfg, keys), resolve=True)  # type: ignore[return-value]

    def sweep(self, arguments: list[str]) -> Any:
        from orchestra.cli.sweep import run_from_sweeper

        return run_from_sweeper(self.settings, list(arguments), self.compose)


def ensure_registered() -> None:
    """Register the sweeper with Hydra by hand.

    Hydra finds plugins by scanning the ``hydra_plugins`` package; an editable install's import
    hook hides the folder from that scan, so the commands call this before Hydra starts (for a
    regular install it repeats what the scan did). Not called at import: the scan imports this
    module while Hydra's plugin registry is being built.
    """
    from hydra.core.plugins import Plugins

    Plugins.instance().register(OrchestraSweeper)
