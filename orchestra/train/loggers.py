"""Loggers: CSV always (metrics.csv in the run dir), W&B on request.

Lightning's CSV writer deletes an existing metrics.csv when its directory is not empty, which
would erase the history of a run that resumes in the same run dir. The writer below keeps it and
drops only the rows at or after the resumed step (logged after the checkpoint by the run that
died), so metrics.csv reads as one uninterrupted run.

Lightning writes a step's row only after the callbacks' ``on_train_batch_end``, where the
checkpoint of that step is saved: a job killed in between (a node failure) would lose the row of
the checkpointed step, which the resumed run never recomputes. So each checkpoint carries that
row's loss (CausalLMModule.on_save_checkpoint, ``orchestra.last_row``), and the writer puts it
back when it is missing.
"""

from __future__ import annotations

import csv
import os
import secrets
import string
from pathlib import Path
from typing import Any

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from orchestra.config import LoggerConfig, LoggerName, WandbMode


class _ResumingWriter(ExperimentWriter):
    def __init__(self, log_dir: str, resume_step: int | None, last_row: dict[str, Any] | None = None) -> None:
        self._resume_step = resume_step
        self._last_row = last_row
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            rows = list(reader)
        if self._resume_step is not None:
            rows = [
                r
                for r in rows
                if r.get("step") not in (None, "") and int(float(r["step"])) < self._resume_step
            ]
            last = self._last_row
            if last and not any(int(float(r["step"])) == int(last["step"]) for r in rows):
                header += [k for k in last["metrics"] if k not in header]
                rows.append(
                    {"step": str(int(last["step"])), **{k: repr(v) for k, v in last["metrics"].items()}}
                )
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=header)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, path)
        self.metrics_keys = sorted(header)


class ResumableCSVLogger(CSVLogger):
    """CSVLogger writing ``<run_dir>/metrics.csv`` and continuing it across resumes.

    Rows are flushed every step (an appended line), so a killed job loses at most the row of the
    step it was logging: a later step is re-logged by the resumed run, the checkpointed step's
    loss comes back from the checkpoint (``last_row``, see the module docstring).
    """

    def __init__(
        self, run_dir: str | Path, resume_step: int | None = None, last_row: dict[str, Any] | None = None
    ) -> None:
        super().__init__(save_dir=str(run_dir), name="", version="", flush_logs_every_n_steps=1)
        self._resume_step = resume_step
        self._last_row = last_row

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ResumingWriter(self.log_dir, self._resume_step, self._last_row)
        return self._experiment


def wandb_mode(cfg: LoggerConfig) -> str:
    """offline unless the user has configured W&B (API key in the environment or ~/.netrc)."""
    if cfg.wandb_mode != WandbMode.auto:
        return cfg.wandb_mode.value
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path.home() / ".netrc"
    if netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return "online"
    return "offline"


def wandb_run_id(run_dir: Path) -> str:
    """One W&B run per run dir: the id is created once and kept in the run dir."""
    id_file = run_dir / "wandb_run_id"
    if id_file.is_file():
        return id_file.read_text().strip()
    # W&B's own id format (8 lowercase alphanumerics); its generator moved between releases.
    alphabet = string.ascii_lowercase + string.digits
    run_id = "".join(secrets.choice(alphabet) for _ in range(8))
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = id_file.with_suffix(".tmp")
    tmp.write_text(run_id)
    os.replace(tmp, id_file)
    return run_id


def run_tags(config: dict[str, Any]) -> list[str]:
    """Tags every W&B run carries so dashboards can filter by model, strategy and experiment."""
    return [
        f"model:{config['model']['name']}",
        f"strategy:{config['strategy']['name']}",
        f"experiment:{config['name']}",
        *config["logger"]["tags"],
    ]


def build_loggers(
    cfg: LoggerConfig,
    run_dir: Path,
    run_name: str,
    config: dict[str, Any],
    resume_step: int | None,
    is_global_zero: bool,
    last_row: dict[str, Any] | None = None,
) -> list[Logger]:
    loggers: list[Logger] = [ResumableCSVLogger(run_dir, resume_step=resume_step, last_row=last_row)]
    if cfg.name == LoggerName.wandb:
        mode = wandb_mode(cfg)
        os.environ.setdefault("WANDB_SILENT", "true")
        run_id = wandb_run_id(run_dir) if is_global_zero else None
        loggers.append(
            WandbLogger(
                project=cfg.wandb_project,
                entity=cfg.wandb_entity,
                name=run_name,
                id=run_id,
                resume="allow",
                save_dir=str(run_dir),
                offline=mode == "offline",
                mode=mode,
                group=cfg.group or run_name,
                tags=run_tags(config),
                config=config,
                log_model=cfg.wandb_log_checkpoints,
            )
        )
    return loggers
