"""`sbatch slurm/prepare.sh` on the real two-node cluster: the pipeline's stages as job arrays
of four tasks chained with afterok, checked against the same preparation run in-process with the
local executor (the reference); then a driver that failed after its stages is submitted again and
resumes without running a single task twice."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from orchestra.config import DataConfig, DataSource, DedupConfig, PIIConfig, PipelineConfig
from orchestra.data.pack import prepare_dataset
from tests.slurm.conftest import SlurmCluster
from tests.slurm.test_slurm_pretrain import job_env  # noqa: F401 - a fixture

pytestmark = pytest.mark.slow

TASKS = 4
SENTENCES = [
    "The harbour master counted the boats that came in before the storm.",
    "A long winter had emptied the granaries of the northern villages.",
    "Merchants from the coast brought salt, cloth and news of the war.",
    "The council argued late into the night about the price of bread.",
    "Children ran along the walls to watch the ships unload their cargo.",
    "Nobody remembered a colder spring since the old bridge was built.",
]


def write_corpus(folder: Path) -> Path:
    """Documents with planted exact copies, personal data and a few too short to keep."""
    rng = random.Random(11)
    docs = [" ".join(rng.choice(SENTENCES) for _ in range(rng.randint(6, 14))) + f" Entry {i}, {rng.random()}."
            for i in range(80)]  # fmt: skip
    docs += docs[:6]  # exact copies
    docs += [f"Write to clerk{i}@harbour.example.org about the tolls. " + docs[i] for i in range(4)]
    docs += ["tiny", "also tiny"]
    rng.shuffle(docs)
    path = folder / "chronicle.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def overrides(corpus: Path, cache: Path, name: str) -> list[str]:
    return [
        "data=files",
        f"data.paths=[{corpus}]",
        f"data.cache_dir={cache}",
        f"data.name={name}",
        "data.vocab_size=300",
        "data.pipeline.enabled=true",
        "data.pipeline.clean.min_chars=20",
        "data.pipeline.pii.enabled=true",
        "data.pipeline.dedup.exact=true",
        f"data.pipeline.tasks={TASKS}",
        f"data.pipeline.workers={TASKS}",
        "data.pipeline.slurm.poll_seconds=1",
        "data.pipeline.slurm.time=10:00",
    ]


def submit(slurm_cluster: SlurmCluster, env: dict[str, str], log: Path, args: list[str]) -> str:
    return slurm_cluster.sbatch("--cpus-per-task=1", "--time=10:00", f"--output={log}", "slurm/prepare.sh",
                                *args, env=env)  # fmt: skip


def completion_times(logs: Path) -> dict[str, int]:
    return {str(p.relative_to(logs)): p.stat().st_mtime_ns for p in logs.rglob("completions/*")}


def test_stages_run_as_chained_arrays_and_match_the_local_run(
    slurm_cluster: SlurmCluster,
    job_env: dict[str, str],  # noqa: F811
    tmp_path: Path,
) -> None:
    corpus = write_corpus(tmp_path)
    cache = tmp_path / "data"
    job = submit(slurm_cluster, job_env, tmp_path / "prepare.out", overrides(corpus, cache, "chronicle"))

    # The reference, in this process with the local executor, while the job runs.
    pipeline = PipelineConfig(enabled=True, tasks=TASKS, workers=2, pii=PIIConfig(enabled=True),
                              dedup=DedupConfig(exact=True))  # fmt: skip
    pipeline.clean.min_chars = 20
    reference = prepare_dataset(
        DataConfig(name="chronicle", source=DataSource.files, paths=[str(corpus)],
                   cache_dir=str(tmp_path / "local"), vocab_size=300, pipeline=pipeline),
        seed=1234,  # orchestra-prepare's default
    )  # fmt: skip

    info = slurm_cluster.wait(job, timeout=420)
    log = (tmp_path / "prepare.out").read_text()
    assert info["JobState"] == "COMPLETED", log[-4000:]
    out = cache / "chronicle"
    manifest = json.loads((out / "manifest.json").read_text())
    ref = json.loads((reference / "manifest.json").read_text())
    record, ref_record = manifest["pipeline"], ref["pipeline"]
    assert record["executor"] == "slurm" and ref_record["executor"] == "local"
    for key in ("dropped", "kept_documents", "kept_by_source", "languages", "tokens_by_source"):
        assert record[key] == ref_record[key], key
    assert record["dropped"]["dedup:exact"] == 6 and record["dropped"]["clean:too_short"] == 2
    # Same documents in the same order: the same tokenizer and byte-identical shards.
    assert manifest["tokenizer"]["sha256"] == ref["tokenizer"]["sha256"]
    assert manifest["splits"] == ref["splits"]

    # Every stage ran as an array of TASKS elements, each its own Slurm job with its own log.
    jobs = json.loads((out / "pipeline" / "slurm-jobs.json").read_text())
    assert list(jobs) == ["filter-files", "dedup-exact-hashes", "dedup-exact-find", "dedup-exact-filter"]
    for stage, array in jobs.items():
        logs = sorted((out / "pipeline" / "logs" / stage / "slurm").glob(f"{array}_*.out"))
        assert [p.name for p in logs] == [f"{array}_{i}.out" for i in range(TASKS)], stage
        assert len(list((out / "pipeline" / "logs" / stage / "completions").iterdir())) == TASKS
        assert f"{stage}: job array {array} ({TASKS} task(s))" in log
    assert len(set(jobs.values())) == len(jobs)
    stages = {s["name"]: s for s in record["stages"]}
    assert stages["filter-files"]["documents_in"] == 92 and stages["filter-files"]["tasks"] == TASKS


def test_a_failed_driver_resubmitted_skips_every_completed_task(
    slurm_cluster: SlurmCluster,
    job_env: dict[str, str],  # noqa: F811
    tmp_path: Path,
) -> None:
    corpus = write_corpus(tmp_path)
    cache = tmp_path / "data"
    args = overrides(corpus, cache, "retry")
    # The stages succeed, then the driver fails on a tokenizer file that does not exist.
    missing = tmp_path / "no-such-tokenizer.json"
    first = submit(slurm_cluster, job_env, tmp_path / "first.out", [*args, f"data.tokenizer_path={missing}"])
    info = slurm_cluster.wait(first, timeout=420)
    first_log = (tmp_path / "first.out").read_text()
    assert info["JobState"] == "FAILED" and info["ExitCode"].startswith("2:"), first_log[-3000:]
    assert str(missing) in first_log
    assert not (cache / "retry").exists()
    (work,) = cache.glob(".retry.pipeline-*")
    done = completion_times(work / "logs")
    assert len(done) == 4 * TASKS

    second = submit(slurm_cluster, job_env, tmp_path / "second.out", args)
    info = slurm_cluster.wait(second, timeout=420)
    log = (tmp_path / "second.out").read_text()
    assert info["JobState"] == "COMPLETED", log[-3000:]
    for stage in ("filter-files", "dedup-exact-hashes", "dedup-exact-find", "dedup-exact-filter"):
        assert f"{stage}: every task already completed" in log
    out = cache / "retry"
    assert completion_times(out / "pipeline" / "logs") == done  # no task ran again
    assert json.loads((out / "manifest.json").read_text())["pipeline"]["dropped"]["dedup:exact"] == 6
