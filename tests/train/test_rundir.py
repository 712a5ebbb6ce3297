"""No silent restarts: resume=auto names what it skips, refuses a dir of unusable checkpoints, and
never continues a run dir another job or another config started; last.ckpt is never versioned."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import subprocess
import uuid
import warnings
from pathlib import Path

import pytest

from orchestra.config import ConfigError, job_id
from orchestra.train.checkpoint import CheckpointError, checkpoint_step
from orchestra.train.run import plan_run, train
from orchestra.train.rundir import RECORD_NAME, RunRecord, job_identity, read_record
from tests.helpers import tiny_config

ROOT = Path(__file__).resolve().parents[2]


def digests(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def copy_run(trained_run: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    return run


def test_all_checkpoints_unusable_is_refused_listing_them_and_nothing_changes(
    corpus_dir: Path, data_cache: Path, trained_run: Path, tmp_path: Path
) -> None:
    run = copy_run(trained_run, tmp_path)
    ckpts = run / "checkpoints"
    for ckpt in ckpts.glob("*.ckpt"):
        ckpt.write_bytes(b"not a checkpoint" * 10)  # a foreign or corrupted file under the name
    (ckpts / "step0000100.ckpt").write_bytes(os.urandom(512))
    before = digests(run)
    cfg = tiny_config(corpus_dir, data_cache, run, max_steps=40)
    with pytest.raises(CheckpointError) as err:
        plan_run(cfg)
    message = str(err.value)
    for name in ("step0000100.ckpt", "step0000030.ckpt", "last.ckpt"):
        assert name in message
    assert "resume=never" in message
    assert digests(run) == before
    # resume=never is the way to start over, and says so by training from step 0.
    result = train(
        dataclasses.replace(cfg, resume="never", trainer=dataclasses.replace(cfg.trainer, max_steps=5))
    )
    assert result.summary["resumed_from"] is None and result.summary["steps"] == 5


def test_skipped_checkpoints_are_named_on_the_console(
    corpus_dir: Path, data_cache: Path, trained_run: Path, tmp_path: Path
) -> None:
    run = copy_run(trained_run, tmp_path)
    (run / "checkpoints" / "step0000040.ckpt").write_bytes(b"\0" * 100)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = plan_run(tiny_config(corpus_dir, data_cache, run, max_steps=40))
    assert plan.resume_path is not None and checkpoint_step(plan.resume_path) == 30
    texts = [str(w.message) for w in caught]
    assert any("skipping checkpoint" in t and "step0000040.ckpt" in t for t in texts), texts


def test_resume_refuses_another_config_or_another_job_unless_named(
    corpus_dir: Path, data_cache: Path, trained_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = copy_run(trained_run, tmp_path)
    cfg = tiny_config(corpus_dir, data_cache, run, max_steps=40)
    record = read_record(run)
    assert record is not None and record.job == "local" and record.settings["optim.lr"] == cfg.optim.lr
    changed = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=1e-4))
    with pytest.raises(ConfigError, match=r"optim\.lr: 0\.003 -> 0\.0001"):
        plan_run(changed)
    # A larger step budget continues the same run.
    assert plan_run(cfg).resume_step == 30

    monkeypatch.setenv("SLURM_JOB_ID", "17")
    monkeypatch.setenv("SLURM_CLUSTER_NAME", "other")
    assert job_identity() == "other-17" == job_id()
    with pytest.raises(ConfigError, match=r"belongs to job 'local', this is 'other-17'"):
        plan_run(cfg)
    named = run / "checkpoints" / "step0000030.ckpt"
    plan = plan_run(dataclasses.replace(changed, resume=str(named)))
    assert plan.resume_path == named
    assert read_record(run) == RunRecord.of(plan.config)  # the explicit resume took the dir over


def test_last_ckpt_is_replaced_never_versioned(
    corpus_dir: Path, data_cache: Path, trained_run: Path, tmp_path: Path
) -> None:
    # A copied run dir is what made Lightning version last.ckpt (its remembered path differs).
    run = copy_run(trained_run, tmp_path)
    result = train(tiny_config(corpus_dir, data_cache, run, max_steps=35))
    assert result.summary["steps"] == 35
    ckpts = run / "checkpoints"
    assert not [p.name for p in ckpts.iterdir() if p.name.startswith("last-v")]
    assert checkpoint_step(ckpts / "last.ckpt") == 35
    assert (run / RECORD_NAME).is_file()


def run_id_script(runs: Path, job: str, restart: int) -> str:
    env = {
        "PATH": os.environ["PATH"],
        "SLURM_JOB_ID": job,
        "SLURM_CLUSTER_NAME": "alpha",
        "SLURM_RESTART_COUNT": str(restart),
        "ORCHESTRA_RUNS": str(runs),
    }
    out = subprocess.run(
        ["bash", "-c", f"source {ROOT}/slurm/common.sh && orch_setup_run_id && echo $ORCHESTRA_JOB_ID"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


def test_batch_script_run_id_survives_requeues_and_a_reused_job_id_gets_a_new_one(tmp_path: Path) -> None:
    first = run_id_script(tmp_path, "42", 0)
    assert first.startswith("alpha-42-")
    assert run_id_script(tmp_path, "42", 1) == first == run_id_script(tmp_path, "42", 2)
    stale = tmp_path / ".slurm" / "alpha-42.run-id"
    stale.write_text("alpha-42-19990101-000000\n")  # an old job that had the same id
    fresh = run_id_script(tmp_path, "42", 0)
    assert fresh != "alpha-42-19990101-000000" and fresh.startswith("alpha-42-")


def test_torchrun_ids_name_the_job_except_standalone_launches(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("ORCHESTRA_JOB_ID", "SLURM_JOB_ID", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    assert job_identity() == "local"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "pretrain-7b")  # torchrun --rdzv-id=pretrain-7b
    assert job_identity() == "pretrain-7b" == job_id()
    # torchrun --standalone draws a new uuid4 per launch: a relaunch must resume, so it is "local".
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", str(uuid.uuid4()))
    assert job_identity() == "local"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    assert job_identity() == "local"
