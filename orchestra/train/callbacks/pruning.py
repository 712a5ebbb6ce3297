"""Optuna pruning inside a trial's training run: report the monitored metric at every validation,
stop the run cleanly when the study's pruner says so.

Rank 0 alone talks to the study's storage (a journal file on a shared filesystem, or a
database) and decides; the decision is broadcast so every rank stops at the same step, through
Lightning's ``should_stop`` (the run then saves and summarises as any run does, and its
summary.json says the trial was pruned). optuna-integration's PyTorchLightningPruningCallback
is not used: under DDP it insists on an RDB storage and decides on every rank separately.

The pruner is not kept in Optuna's storage, so the sweeper stores its settings as a study user
attribute (:data:`PRUNER_ATTR`) and the trial rebuilds the same pruner from them here.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from orchestra.config import TrialConfig

log = logging.getLogger(__name__)

PRUNER_ATTR = "orchestra_pruner"


def open_storage(url: str) -> Any:
    """An Optuna storage from ``url``: an RDB URL (``sqlite:///x.db``, ``postgresql://...``) or a
    journal file path (the default: one append-only file, safe on a shared filesystem through its
    open lock)."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    if "://" in url:
        return optuna.storages.RDBStorage(url)
    path = Path(url)
    path.parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(
        JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path)))
    )


def make_pruner(spec: dict[str, Any] | None) -> Any:
    """The pruner named by ``spec["name"]`` (median, successive_halving, hyperband, none) with its options."""
    import optuna

    spec = dict(spec or {"name": "none"})
    name = str(spec.pop("name", "none"))
    pruners = {
        "none": optuna.pruners.NopPruner,
        "median": optuna.pruners.MedianPruner,
        "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
        "hyperband": optuna.pruners.HyperbandPruner,
    }
    if name not in pruners:
        raise ValueError(f"pruner {name!r}: choose one of {', '.join(pruners)}")
    return pruners[name](**spec) if name != "none" else pruners[name]()


class TrialPruning(Callback):
    """Reports ``cfg.monitor`` to the trial at each validation; stops every rank when it is pruned."""

    def __init__(self, cfg: TrialConfig, run_dir: Path) -> None:
        assert cfg.storage is not None and cfg.study is not None and cfg.number is not None
        self.cfg = cfg
        self.run_dir = run_dir
        self.trial: Any = None
        self.pruned_at_step: int | None = None
        self.reported = 0
        self.multi_objective = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not trainer.is_global_zero or self.trial is not None:
            return
        import optuna

        assert self.cfg.storage is not None and self.cfg.number is not None
        storage = open_storage(self.cfg.storage)
        study = optuna.load_study(study_name=self.cfg.study, storage=storage)
        study.pruner = make_pruner(study.user_attrs.get(PRUNER_ATTR))
        study_id = storage.get_study_id_from_name(self.cfg.study)
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, self.cfg.number)
        self.trial = optuna.trial.Trial(study, trial_id)
        self.multi_objective = len(study.directions) > 1

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.pruned_at_step is not None:
            return
        prune = False
        if trainer.is_global_zero and self.trial is not None and not self.multi_objective:
            value = trainer.callback_metrics.get(self.cfg.monitor)
            if value is not None:
                self.trial.report(float(value), step=trainer.global_step)
                self.reported += 1
                # At the last step there is nothing left to save: the trial completes instead.
                final = trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps
                prune = bool(self.cfg.prune and not final and self.trial.should_prune())
        prune = bool(trainer.strategy.broadcast(prune, src=0))
        if prune:
            self.pruned_at_step = trainer.global_step
            trainer.should_stop = True
            log.info("trial %s pruned at step %d", self.cfg.number, trainer.global_step)

    def record(self) -> dict[str, Any]:
        """The trial's entry in summary.json."""
        return {
            "study": self.cfg.study,
            "number": self.cfg.number,
            "monitor": self.cfg.monitor,
            "pruned": self.pruned_at_step is not None,
            "pruned_at_step": self.pruned_at_step,
        }
