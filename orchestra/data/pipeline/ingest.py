"""The pipeline's first stage: every source's documents as uniform jsonl.gz shards, with a subset.

Sources are read here rather than by datatrove's readers because the policies the pipeline
promises apply at reading: a record with empty, null or missing text is skipped and counted (or
fails naming the file and line, ``missing_text=fail``), bad UTF-8 is decoded with replacement
characters and counted instead of crashing, gzip and zstd jsonl and Parquet files are read the
same way, the bundled corpora read as in training, and ``subset`` picks the same documents on
every run. Each shard then feeds datatrove's JsonlReader, so every later stage is datatrove's.

A document's id is ``<source>/<file>#<record>``; its metadata carries the source name, the file
and the record number, and everything later (exclusions, the data card) is keyed on those.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from orchestra.config import DataConfig, DataSource, MissingText, PipelineConfig, SourceSpec
from orchestra.data.errors import DataError

SHARD_DOCUMENTS = 2_000  # documents per ingested file at most
TEXT_SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")


@dataclass
class IngestCounts:
    """What reading one source found."""

    files: int = 0
    documents: int = 0
    bytes: int = 0
    skipped: Counter[str] = field(default_factory=Counter)  # reason -> documents
    replaced_utf8: int = 0  # documents whose bad bytes were replaced with U+FFFD
    subset_dropped: int = 0

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IngestCounts:
        return cls(
            files=int(data["files"]),
            documents=int(data["documents"]),
            bytes=int(data["bytes"]),
            skipped=Counter(data.get("skipped", {})),
            replaced_utf8=int(data.get("replaced_utf8", 0)),
            subset_dropped=int(data.get("subset_dropped", 0)),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "files": self.files,
            "documents": self.documents,
            "bytes": self.bytes,
            "skipped": dict(sorted(self.skipped.items())),
            "replaced_utf8": self.replaced_utf8,
            "subset_dropped": self.subset_dropped,
        }


def sources_of(cfg: DataConfig) -> list[SourceSpec]:
    """The pipeline's sources: data.pipeline.sources, else data.source / data.paths as one."""
    if cfg.pipeline.sources:
        return list(cfg.pipeline.sources)
    source = DataSource(cfg.source)
    paths = list(cfg.paths) if source == DataSource.files else [source.value]
    return [
        SourceSpec(
            name=source.value if source != DataSource.files else "files",
            paths=paths,
            text_field=cfg.text_field,
        )
    ]


def source_files(spec: SourceSpec, cfg: DataConfig) -> tuple[str, list[Path]]:
    """(how to read them, the files) of one source: a bundled corpus name or files and globs."""
    from orchestra.data.sources import expand_paths, shakespeare_corpus, stdlib_corpus

    if spec.paths == [DataSource.shakespeare.value]:
        return "shakespeare", shakespeare_corpus(Path(cfg.cache_dir), cfg.shakespeare_version).files
    if spec.paths == [DataSource.stdlib.value]:
        return "stdlib", stdlib_corpus().files
    plain = [p for p in spec.paths if not str(p).endswith((".gz", ".zst"))]
    compressed = [Path(p) for p in spec.paths if str(p).endswith((".gz", ".zst"))]
    files = expand_paths(plain) if plain else []
    for path in compressed:
        matches = sorted(path.parent.glob(path.name)) if any(c in path.name for c in "*?[") else [path]
        if not matches or not all(m.is_file() for m in matches):
            raise DataError(f"data.pipeline.sources[{spec.name}]: {path} matches no file")
        files.extend(matches)
    return "files", files


def _open_text(path: Path) -> IO[bytes]:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.name.endswith(".zst"):
        import zstandard

        # A buffered reader over the stream, so lines can be iterated as with gzip.
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb")))  # type: ignore[arg-type]
    return open(path, "rb")


def _decode(raw: bytes, counts: IngestCounts) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        counts.replaced_utf8 += 1
        return raw.decode("utf-8", errors="replace")


def read_source(
    spec: SourceSpec, kind: str, files: list[Path], policy: MissingText, counts: IngestCounts
) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(id, text, metadata) of every document of one source, in file order."""
    from orchestra.data.sources import clean_shakespeare

    for path in files:
        counts.files += 1
        try:
            if path.name.endswith(".parquet"):
                records: Iterator[tuple[int, Any]] = enumerate(_parquet_texts(path, spec.text_field))
            elif path.name.endswith((".jsonl", ".jsonl.gz", ".jsonl.zst")):
                records = _jsonl_texts(path, spec, policy, counts)
            else:
                raw = path.read_bytes()
                counts.bytes += len(raw)
                text = _decode(raw[3:] if raw.startswith(b"\xef\xbb\xbf") else raw, counts)
                records = iter([(0, clean_shakespeare(text) if kind == "shakespeare" else text)])
            for n, text in records:
                if text is None or not str(text).strip():
                    reason = "null_text" if text is None else "empty_text"
                    if policy == MissingText.fail:
                        raise DataError(
                            f"{path} record {n}: {reason.replace('_', ' ')} (data.pipeline.missing_text=fail)"
                        )
                    counts.skipped[reason] += 1
                    continue
                counts.documents += 1
                meta = {"source": spec.name, "file": str(path), "record": n}
                yield f"{spec.name}/{path.name}#{n}", str(text), meta
        except OSError as err:
            raise DataError(f"{path}: cannot read ({err.strerror or err})") from None


def _jsonl_texts(
    path: Path, spec: SourceSpec, policy: MissingText, counts: IngestCounts
) -> Iterator[tuple[int, str | None]]:
    try:
        with _open_text(path) as fh:
            for lineno, raw in enumerate(fh, start=1):
                counts.bytes += len(raw)
                line = _decode(raw, counts)
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(
                        f"{path}:{lineno}: not valid JSON ({err.msg} at column {err.colno})"
                    ) from None
                if not isinstance(record, dict):
                    raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
                if spec.text_field not in record:
                    if policy == MissingText.fail:
                        raise DataError(
                            f"{path}:{lineno}: no field {spec.text_field!r} (found {sorted(record)}); "
                            "data.pipeline.missing_text=fail"
                        )
                    counts.skipped["missing_field"] += 1
                    continue
                value = record[spec.text_field]
                if value is not None and not isinstance(value, str):
                    raise DataError(
                        f"{path}:{lineno}: field {spec.text_field!r} is {type(value).__name__}, expected a string"
                    )
                yield lineno, value
    except (EOFError, gzip.BadGzipFile) as err:
        raise DataError(f"{path}: truncated or corrupt compressed file ({err})") from None
    except Exception as err:
        if type(err).__module__.startswith("zstd") or "zstd" in type(err).__name__.lower():
            raise DataError(f"{path}: corrupt zstd file ({err})") from None
        raise


def _parquet_texts(path: Path, text_field: str) -> Iterator[str | None]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        if text_field not in pf.schema_arrow.names:
            raise DataError(f"{path}: no column {text_field!r} (columns: {pf.schema_arrow.names})")
        for batch in pf.iter_batches(columns=[text_field]):
            yield from batch.column(0).to_pylist()
    except (OSError, pa.ArrowException) as err:
        raise DataError(f"{path}: not a readable Parquet file ({err})") from None


def _key(doc_id: str, seed: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{doc_id}".encode()).digest()[:8], "big")


def ingest(cfg: DataConfig, out: Path, seed: int, slots: int = 1) -> dict[str, IngestCounts]:
    """Write every source's documents (the subset, if one is set) to ``out/<source>/*.jsonl.gz``,
    dealt over ``slots`` files (the stage's task count) so the tasks share the work.

    The subset is chosen by a hash of each document's id and the seed: a fraction keeps the
    documents whose hash falls below it; a count keeps the ones with the smallest hashes over all
    sources (a second pass), so the same subset comes back on every run and machine.
    """
    pipeline: PipelineConfig = cfg.pipeline
    counts: dict[str, IngestCounts] = {}
    keep: set[str] | None = None
    subset = pipeline.subset
    if subset is not None and subset >= 1:
        ranked: list[tuple[int, str]] = []
        for spec in sources_of(cfg):
            kind, files = source_files(spec, cfg)
            scratch = IngestCounts()
            ranked.extend(
                (_key(i, seed), i)
                for i, _, _ in read_source(spec, kind, files, pipeline.missing_text, scratch)
            )
        keep = {i for _, i in sorted(ranked)[: int(subset)]}
    for spec in sources_of(cfg):
        kind, files = source_files(spec, cfg)
        c = counts[spec.name] = IngestCounts()
        folder = out / spec.name
        folder.mkdir(parents=True, exist_ok=True)
        # Documents are dealt round-robin into `slots` files at a time, so every one of the stage's
        # tasks (datatrove gives task r the files r, r + tasks, ...) gets an equal share.
        handles: list[Any] = [None] * slots
        in_file = [0] * slots
        rolls = [0] * slots
        chosen_count = 0
        try:
            for doc_id, text, meta in read_source(spec, kind, files, pipeline.missing_text, c):
                chosen = keep is None or doc_id in keep
                if subset is not None and subset < 1:
                    chosen = _key(doc_id, seed) < subset * 2**64
                if not chosen:
                    c.subset_dropped += 1
                    continue
                slot = chosen_count % slots
                chosen_count += 1
                if handles[slot] is None or in_file[slot] == SHARD_DOCUMENTS:
                    if handles[slot] is not None:
                        handles[slot].close()
                    name = f"{rolls[slot]:05d}-{slot:05d}.jsonl.gz"
                    handles[slot] = gzip.open(folder / name, "wt", encoding="utf-8")  # noqa: SIM115 - closed below
                    rolls[slot], in_file[slot] = rolls[slot] + 1, 0
                handles[slot].write(
                    json.dumps({"id": doc_id, "text": text, "metadata": meta}, ensure_ascii=False) + "\n"
                )
                in_file[slot] += 1
        finally:
            for fh in handles:
                if fh is not None:
                    fh.close()
    return counts
