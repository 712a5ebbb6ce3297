"""bench/gpu_session.sh off the GPU: it parses, and its `--list` plan is complete and fits its time box."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SESSION = ROOT / "bench" / "gpu_session.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")


@dataclass
class Row:
    """One stage of `--list`: what a run would start, and the limit it would get in the worst case."""

    stage: str
    group: str  # stages of one group start together and share one limit
    budget: int
    min: int
    limit: int | None  # None: skipped, the time box left cannot fit its minimum
    function: str


@dataclass
class Plan:
    rows: list[Row]
    time_box: int
    worst_case: int


def session(
    tmp_path: Path, *args: str, script: Path = SESSION, **env: str
) -> subprocess.CompletedProcess[str]:
    """Run the script with its outputs pointed into ``tmp_path`` and no stage selection inherited."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("GPU_SESSION_")}
    base |= {"OUT": str(tmp_path / "out"), "GPU_SESSION_WORK": str(tmp_path / "work"), **env}
    return subprocess.run(["bash", str(script), *args], env=base, capture_output=True, text=True, timeout=60)


def list_plan(tmp_path: Path, **env: str) -> Plan:
    proc = session(tmp_path, "--list", **env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists(), "--list wrote files"
    rows = []
    for line in proc.stdout.splitlines():
        if line and not line.startswith("#"):
            stage, group, budget, min_s, limit, function = line.split()
            rows.append(
                Row(
                    stage,
                    group,
                    int(budget),
                    int(min_s),
                    None if limit == "skipped" else int(limit),
                    function,
                )
            )
    match = re.search(r"^# time box (\d+) s, worst case (\d+) s$", proc.stdout, flags=re.M)
    assert match, proc.stdout
    return Plan(rows, int(match[1]), int(match[2]))


def worst_case(plan: Plan) -> int:
    """Seconds the started groups take when each runs to its limit (a group's stages run in parallel)."""
    limits = {r.group: r.limit for r in plan.rows if r.limit is not None}
    return sum(limits.values())


def test_session_script_parses() -> None:
    subprocess.run(["bash", "-n", str(SESSION)], check=True, timeout=30)


def test_every_stage_has_a_function_and_a_budget_within_the_time_box(tmp_path: Path) -> None:
    plan = list_plan(tmp_path)
    assert plan.rows and len({r.stage for r in plan.rows}) == len(plan.rows)
    for row in plan.rows:
        assert row.function == "stage_" + row.stage.replace("-", "_"), row
        assert 0 < row.min <= row.budget, row
        assert row.limit is None or row.min <= row.limit <= row.budget, row
    assert plan.rows[0].limit == plan.rows[0].budget  # the most valuable stage is never cut
    assert worst_case(plan) == plan.worst_case <= plan.time_box


def test_stage_selection_and_a_smaller_time_box(tmp_path: Path) -> None:
    plan = list_plan(tmp_path, GPU_SESSION_STAGES="energy ds-zero3", GPU_SESSION_BUDGET="200")
    assert [r.stage for r in plan.rows] == ["ds-zero3", "energy"]  # the script's order, not the caller's
    assert plan.time_box == 200 and worst_case(plan) == plan.worst_case <= 200
    parts = list_plan(tmp_path, GPU_SESSION_STAGES="correctness").rows
    assert len(parts) > 1 and {r.group for r in parts} == {"correctness"}
    assert len({r.limit for r in parts}) == 1  # started together, under one limit


def test_an_unknown_stage_is_refused_before_anything_runs(tmp_path: Path) -> None:
    proc = session(tmp_path, GPU_SESSION_STAGES="ds-zero3 ds-zero-3")  # a real run, not --list
    assert proc.returncode == 2 and "unknown stage 'ds-zero-3'" in proc.stdout
    assert not (tmp_path / "out").exists()


def test_a_stage_without_its_function_is_refused(tmp_path: Path) -> None:
    script = tmp_path / "bench" / "gpu_session.sh"
    script.parent.mkdir()
    text = SESSION.read_text()
    assert re.search(r"^stage_energy\(\) ", text, flags=re.M)
    script.write_text(re.sub(r"^stage_energy\(\) ", "unused_energy() ", text, flags=re.M))
    proc = session(tmp_path, "--list", script=script)
    assert proc.returncode == 2 and "stage 'energy' has no function stage_energy" in proc.stdout


def test_every_script_a_stage_calls_exists() -> None:
    text = SESSION.read_text()
    scripts = set(re.findall(r"\b(?:bench|tests/gpu)/\w+\.py\b", text)) - {"bench/x.py"}  # x.py: a comment
    assert "tests/gpu/deepspeed_check.py" in scripts
    for script in scripts:
        assert (ROOT / script).is_file(), script
