"""`orchestra-plan`: the training command line in, a plan (or one clear error) out, nothing else written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from orchestra.cli import plan as plan_cli
from orchestra.config import ConfigError

BIG_JOB = [
    "model=llama-8b",
    "strategy=ddp",
    "trainer.accelerator=gpu",
    "trainer.devices=8",
    "trainer.num_nodes=2",
    "trainer.global_batch_size=256",
    "trainer.micro_batch_size=4",
]


def run_main(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str
) -> tuple[int, str]:
    """orchestra-plan in this process: (exit status, what it printed)."""
    monkeypatch.setattr(sys, "argv", ["orchestra-plan", *args])
    monkeypatch.setattr(plan_cli.console, "width", 200)
    code = 0
    try:
        plan_cli.main()
    except SystemExit as err:
        code = err.code if isinstance(err.code, int) else 1
    return code, capsys.readouterr().out


def test_the_command_plans_the_debug_job_and_writes_nothing_else(tmp_path: Path) -> None:
    """The installed entry point: exit 0, the tables, the JSON where asked, and no run directory."""
    out = tmp_path / "plan.json"
    env = {**os.environ, "COLUMNS": "200"}
    proc = subprocess.run(
        [sys.executable, "-m", "orchestra.cli.plan", "experiment=debug", f"plan.out={out}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for heading in ("Orchestra plan", "Memory per rank", "Time", "Budget for"):
        assert heading in proc.stdout
    document = json.loads(out.read_text())
    assert document["fits"] and document["verdict"] == "fits"
    rows = document["memory_rows"]
    assert sum(r["gib"] for r in rows) == pytest.approx(document["memory_total_gib"])
    assert {r["key"] for r in rows} >= {"parameters", "gradients", "optimizer", "activations", "logits"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]  # no outputs/, runs/ or .hydra


def test_a_layout_that_cannot_fit_is_refused_naming_a_fix_that_does(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out = tmp_path / "plan.json"
    code, text = run_main(monkeypatch, capsys, *BIG_JOB, "plan.fail_above=1.1", f"plan.out={out}")
    assert code == plan_cli.OUT_OF_MEMORY_EXIT_CODE, text
    assert "does not fit" in text and "ORCHESTRA_SKIP_PLAN=1" in text
    document = json.loads(out.read_text())
    assert not document["fits"] and document["memory_ratio"] > 1.1
    named = [f for f in document["fixes"] if f["fits"] and f["overrides"]]
    assert named, document["fixes"]
    assert " ".join(named[0]["overrides"]) in text
    # The fix it names, applied on the same command line, is planned to fit.
    code, text = run_main(monkeypatch, capsys, *BIG_JOB, *named[0]["overrides"], "plan.fail_above=1.1")
    assert code == 0, text
    assert "fits" in text


def test_without_fail_above_a_plan_that_does_not_fit_still_exits_zero(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, text = run_main(monkeypatch, capsys, *BIG_JOB)
    assert code == 0
    assert "does not fit" in text and "Changes to try" in text


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["plan.gpux=h100-80gb"], "plan.gpux"),
        (["plan.gpu=tpu-v5"], "plan.gpu"),
        (["plan.power_fraction=2"], "plan.power_fraction"),
        (["plan.tokens=lots"], "plan.tokens"),
        (["trainer.max_stepz=5"], "max_stepz"),
        (["model=llama-9000"], "llama-9000"),
        (["model=llama-8b", "strategy=fsdp", "trainer.devices=8", "strategy.tp=3"], "strategy.tp"),
        (["trainer.devices=3", "strategy=ddp", "trainer.global_batch_size=16"], "trainer.global_batch_size"),
    ],
)
def test_bad_input_is_one_error_naming_the_culprit_and_leaves_an_earlier_plan_alone(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    args: list[str],
    named: str,
) -> None:
    earlier = tmp_path / "plan.json"
    earlier.write_text('{"earlier": true}\n')
    code, text = run_main(monkeypatch, capsys, "experiment=debug", *args, f"plan.out={earlier}")
    assert code == 2, text
    assert text.count("error:") == 1 and named in text, text
    assert "Traceback" not in text
    assert earlier.read_text() == '{"earlier": true}\n'


def test_site_defaults_apply_and_the_command_line_wins(tmp_path: Path) -> None:
    site = tmp_path / "plan.yaml"
    site.write_text("gpu: a100-40gb\ngrid_g_per_kwh: 30\n")
    assert plan_cli.plan_config([], site).gpu == "a100-40gb"
    chosen = plan_cli.plan_config(["gpu=h200-141gb"], site)
    assert (chosen.gpu, chosen.grid_g_per_kwh) == ("h200-141gb", 30)
    site.write_text("gpuu: a100-40gb\n")
    with pytest.raises(ConfigError, match=r"plan\.gpuu"):
        plan_cli.plan_config([], site)


def test_training_overrides_and_plan_keys_are_split() -> None:
    train, plan = plan_cli.split_arguments(
        ["model=llama-1b", "plan.gpu=l40s", "trainer.devices=8", "plan.tokens=1e9"]
    )
    assert train == ["model=llama-1b", "trainer.devices=8"]
    assert plan == ["gpu=l40s", "tokens=1e9"]
