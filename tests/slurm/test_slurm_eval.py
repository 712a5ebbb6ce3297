"""`sbatch slurm/eval.sh` on the real two-node cluster: arrays over checkpoints and over tasks, a
plain two-rank job, and bad inputs that fail one element with exit code 2.

All jobs are submitted at once (module fixture) and run side by side; the in-process
`run_eval` references are computed meanwhile.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest

from orchestra.cli.eval import run_eval
from orchestra.config import EvalConfig
from tests.slurm.conftest import SlurmCluster
from tests.slurm.test_slurm_pretrain import job_env  # noqa: F401 - a fixture

pytestmark = pytest.mark.slow

DOCS = ["glob.py.txt", "shlex.py.txt", "heapq.py.txt"]  # small documents of the session corpus


def eval_args(log: str, *sbatch: str) -> list[str]:
    """The overrides of the script's GPU defaults for this CPU cluster, then the script."""
    return [
        *sbatch,
        "--ntasks-per-node=1",
        "--gpus-per-node=0",
        "--cpus-per-task=1",
        "--time=10:00",
        f"--output={log}",
        "slurm/eval.sh",
    ]


def checkpoints(trained_run: Path) -> tuple[Path, Path]:
    """An earlier step checkpoint and last.ckpt of the session's tiny run: two different models."""
    steps = sorted((trained_run / "checkpoints").glob("step*.ckpt"))
    assert len(steps) >= 2, steps
    return steps[0], trained_run / "checkpoints" / "last.ckpt"


def perplexity(folder: Path) -> dict[str, float]:
    document = json.loads((folder / "eval.json").read_text())
    assert list(document["tasks"]) == ["perplexity"]
    return document["tasks"]["perplexity"]["metrics"]


@dataclass
class Jobs:
    root: Path
    ids: dict[str, str]
    """Job id of each submission (an array's elements are <id>_<index>)."""
    refs: dict[str, dict[str, float]]
    """In-process perplexity metrics: early/last checkpoint on one document, last on all three."""


@pytest.fixture(scope="module")
def jobs(
    slurm_cluster: SlurmCluster,
    job_env: dict[str, str],  # noqa: F811
    trained_run: Path,
    corpus_dir: Path,
    data_cache: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Jobs:
    """Submit every job, then compute the in-process references while they run."""
    root = tmp_path_factory.mktemp("slurm-eval")
    early, last = checkpoints(trained_run)
    doc = corpus_dir / DOCS[0]
    common = [f"paths=[{doc}]", f"data_cache={data_cache}"]
    submit = slurm_cluster.sbatch
    ids = {
        # One element per checkpoint.
        "ckpts": submit(
            *eval_args(f"{root}/ckpts-%a.out", "--array=0-1"),
            f"ckpts={early},{last}",
            "tasks=[perplexity]",
            *common,
            f"out={root}/ckpts",
            env=job_env,
        ),
        # One checkpoint, one element per task; the second task does not exist.
        "tasks": submit(
            *eval_args(f"{root}/tasks-%a.out", "--array=0-1"),
            f"ckpt={last}",
            "tasks=[perplexity,nosuch]",
            *common,
            f"out={root}/tasks",
            env=job_env,
        ),
        # No array: one evaluation over two ranks (one per node), examples sharded.
        "plain": submit(
            *eval_args(f"{root}/plain.out", "--nodes=2"),
            f"ckpt={last}",
            "tasks=[perplexity]",
            "paths=[" + ",".join(str(corpus_dir / d) for d in DOCS) + "]",
            f"data_cache={data_cache}",
            f"out={root}/plain",
            env=job_env,
        ),
        # Several checkpoints without --array: refused by the script before Python starts.
        "no-array": submit(
            *eval_args(f"{root}/no-array.out"),
            f"ckpts={early},{last}",
            *common,
            f"out={root}/no-array",
            env=job_env,
        ),
    }

    def reference(ckpt: Path, docs: list[str], name: str) -> dict[str, float]:
        cfg = EvalConfig(
            ckpt=str(ckpt),
            tasks=["perplexity"],
            paths=[str(corpus_dir / d) for d in docs],
            data_cache=str(data_cache),
            device="cpu",
            out=str(root / "reference" / name),
        )
        path = run_eval(cfg)
        assert path is not None
        return perplexity(path.parent)

    refs = {
        "early": reference(early, DOCS[:1], "early"),
        "last": reference(last, DOCS[:1], "last"),
        "last-3": reference(last, DOCS, "last-3"),
    }
    return Jobs(root, ids, refs)


def finished(slurm_cluster: SlurmCluster, job_id: str) -> dict[str, str]:
    return slurm_cluster.wait(job_id, timeout=300)


def assert_same(got: dict[str, float], want: dict[str, float]) -> None:
    assert math.isfinite(got["ppl"]) and got["ppl"] > 1
    assert got["ppl"] == pytest.approx(want["ppl"], rel=1e-6)
    assert got["nll"] == pytest.approx(want["nll"], rel=1e-6)
    assert (got["tokens"], got["documents"]) == (want["tokens"], want["documents"])


def test_array_evaluates_one_checkpoint_per_element(slurm_cluster: SlurmCluster, jobs: Jobs) -> None:
    root, ids, refs = jobs.root, jobs.ids, jobs.refs
    for index, name in enumerate(["early", "last"]):
        info = finished(slurm_cluster, f"{ids['ckpts']}_{index}")
        log = (root / f"ckpts-{index}.out").read_text()
        assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log[-4000:]
        assert f"element {index}): checkpoint {index} of 2" in log
        assert_same(perplexity(root / "ckpts" / str(index)), refs[name])
    assert refs["early"]["ppl"] != refs["last"]["ppl"]  # two different models really were evaluated
    assert sorted(p.name for p in (root / "ckpts").iterdir()) == ["0", "1"]


def test_bad_task_fails_its_element_only_with_exit_code_2(slurm_cluster: SlurmCluster, jobs: Jobs) -> None:
    root, ids, refs = jobs.root, jobs.ids, jobs.refs
    good = finished(slurm_cluster, f"{ids['tasks']}_0")
    bad = finished(slurm_cluster, f"{ids['tasks']}_1")
    good_log, bad_log = (root / "tasks-0.out").read_text(), (root / "tasks-1.out").read_text()
    assert (good["JobState"], good["ExitCode"]) == ("COMPLETED", "0:0"), good_log[-4000:]
    assert_same(perplexity(root / "tasks" / "0"), refs["last"])
    assert (bad["JobState"], bad["ExitCode"], bad["Restarts"]) == ("FAILED", "2:0", "0"), bad_log[-4000:]
    assert "task 1 of 2" in bad_log and "tasks=[nosuch]" in bad_log
    assert "error: tasks: unknown task(s) ['nosuch']" in bad_log
    assert "evaluation failed with exit code 2" in bad_log
    assert "Traceback" not in bad_log
    assert not (root / "tasks" / "1").exists()  # nothing written, nothing of the others touched


def test_plain_job_on_two_ranks_matches_in_process(slurm_cluster: SlurmCluster, jobs: Jobs) -> None:
    root, ids, refs = jobs.root, jobs.ids, jobs.refs
    info = finished(slurm_cluster, ids["plain"])
    log = (root / "plain.out").read_text()
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log[-4000:]
    assert info["NodeList"] == "orch-node[1-2]"
    assert "rank 0/2 (local rank 0) on orch-node1" in log and "rank 1/2 (local rank 0) on orch-node2" in log
    assert "MASTER_ADDR=orch-node1" in log
    assert_same(perplexity(root / "plain"), refs["last-3"])
    assert sorted(p.name for p in (root / "plain").iterdir()) == ["eval.json", "samples"]


def test_several_checkpoints_without_array_are_refused(slurm_cluster: SlurmCluster, jobs: Jobs) -> None:
    root, ids = jobs.root, jobs.ids
    info = finished(slurm_cluster, ids["no-array"])
    log = (root / "no-array.out").read_text()
    assert (info["JobState"], info["ExitCode"]) == ("FAILED", "2:0"), log[-4000:]
    assert "ckpts= names 2 checkpoints: submit with sbatch --array=0-1" in log
    assert not (root / "no-array").exists()
