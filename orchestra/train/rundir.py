"""Whose run dir is this? The job that started it and what it trains, recorded in ``run.json``.

``resume=auto`` continues whatever checkpoint it finds in the run dir. That is right for a
requeued SLURM job and for a local run started again with the same config, and silently wrong
when the dir belongs to someone else: a new job whose id repeats an old one (a cluster whose
state was reset, two clusters on one filesystem) or a run whose config was changed. So the first
start writes ``run.json`` with the job identity and the settings that define what is trained;
every later ``resume=auto`` start compares, and refuses a mismatch with one error naming the
differing keys. ``resume=<checkpoint>`` is the explicit way past it (and rewrites the record).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestra.config import ConfigError, TrainConfig, scheduler_job_id, to_plain
from orchestra.io import atomic_write_text

RECORD_NAME = "run.json"
RECORD_FORMAT = 1

# Settings that do not change what is trained: how fast, where, how it is logged, and the step
# budget (a finished run may be continued with a larger trainer.max_steps).
_FREE = {
    "model.kernels",
    "model.attention",
    "model.sdpa_backend",
    "optim.fused",
    "data.cache_dir",
    "data.tokenize_workers",
    "data.loader_workers",
    "data.shakespeare_version",
}
_SECTIONS = ("model", "data", "optim", "scheduler", "task", "finetune")


def job_identity() -> str:
    """The launch this process belongs to, the same on every rank and across requeues.

    The scheduler's job id (SLURM's with the cluster name and, from the batch scripts, the time
    of the first start, so a repeated job id is another job; torchrun's ``--rdzv-id``), else
    ``local``: every run started by hand is one identity, so starting it again resumes it. So is
    ``torchrun --standalone``, which draws a new uuid4 run id at every launch: that id names one
    launch, not the job a relaunch continues.
    """
    job = scheduler_job_id()
    if job is None or _is_uuid4(job):
        return "local"
    return job


def _is_uuid4(text: str) -> bool:
    try:
        return uuid.UUID(text).version == 4 and str(uuid.UUID(text)) == text.lower()
    except ValueError:
        return False


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: tree}


def trained_settings(cfg: TrainConfig) -> dict[str, Any]:
    """The flattened settings that define what a run trains (see ``_FREE`` for what is left out)."""
    plain = to_plain(cfg)
    settings = {k: v for s in _SECTIONS for k, v in _flatten(plain[s], s).items() if k not in _FREE}
    settings["seed"] = plain["seed"]
    settings["trainer.global_batch_size"] = plain["trainer"]["global_batch_size"]
    return settings


@dataclass(frozen=True)
class RunRecord:
    job: str
    settings: dict[str, Any]

    @classmethod
    def of(cls, cfg: TrainConfig) -> RunRecord:
        # Through JSON, so a record compares equal to the one read back (tuples become lists).
        return cls(job_identity(), json.loads(json.dumps(trained_settings(cfg))))


def read_record(run_dir: Path) -> RunRecord | None:
    path = run_dir / RECORD_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        if data.get("format") != RECORD_FORMAT:
            raise ValueError(f"format {data.get('format')!r}, this version reads {RECORD_FORMAT}")
        return RunRecord(str(data["job"]), dict(data["settings"]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ConfigError(
            f"run dir {run_dir}: {path} is unreadable ({err}); move it away to let resume=auto start "
            "from this dir's checkpoints, or pass resume=<checkpoint>"
        ) from err


def write_record(run_dir: Path, record: RunRecord) -> None:
    text = json.dumps({"format": RECORD_FORMAT, "job": record.job, "settings": record.settings}, indent=1)
    atomic_write_text(run_dir / RECORD_NAME, text + "\n", only_if_changed=True)


def check_resume_allowed(run_dir: Path, current: RunRecord) -> None:
    """Refuse ``resume=auto`` into a run dir another job, or another config, started."""
    recorded = read_record(run_dir)
    if recorded is None:
        return
    how = (
        f"to continue it anyway pass resume=<one of {run_dir}/checkpoints/*.ckpt>; to start over in it, "
        "resume=never; or give this run its own dir (hydra.run.dir=...)"
    )
    if recorded.job != current.job:
        raise ConfigError(
            f"resume=auto: run dir {run_dir} belongs to job {recorded.job!r}, this is {current.job!r} "
            f"(a repeated job id, or two jobs given one dir); {how}"
        )
    changed = sorted(
        k
        for k in set(recorded.settings) | set(current.settings)
        if recorded.settings.get(k) != current.settings.get(k)
    )
    if changed:
        shown = ", ".join(
            f"{k}: {recorded.settings.get(k)!r} -> {current.settings.get(k)!r}" for k in changed[:8]
        )
        more = f" and {len(changed) - 8} more" if len(changed) > 8 else ""
        raise ConfigError(
            f"resume=auto: run dir {run_dir} was started with other settings ({shown}{more}); {how}"
        )
