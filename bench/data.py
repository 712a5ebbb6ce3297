"""Data preparation: our tokenize+pack against raw HF tokenizers and HF datasets, and data.pipeline per stage.

    python bench/data.py                                   # 100 MB corpus, 20 MB through the pipeline, 3 rounds
    python bench/data.py --mb 200 --workers 2 --rounds 5 --work /scratch/bench-data
    python bench/data.py --mb 1 --pipeline-mb 0.5 --rounds 1 --vocab 2048   # a smoke run

The corpus is generated here, deterministically, and nothing is downloaded: web-like English
documents (a title line, a menu line, paragraphs of sentences) from a word-bigram chain fitted on
the docstrings of this interpreter's standard library, with planted web noise: exact and near
copies, pages too short to keep, spam that repeats one sentence, letter soup, cookie and
JavaScript notices, e-mail addresses, phone numbers and IP addresses. It is written as jsonl
(``{"id", "text"}``, about 10 MB a file) to ``<work>/corpus/`` and reused by a later run with the
same size, seed and Python version. MB are 10^6 bytes of UTF-8 document text (not of the jsonl).

Tokenization, three methods, each given ``--workers`` (2) cores' worth of parallelism, in one run,
interleaved round by round (A B C, then B C A, then C A B, ...); medians are reported:

- ``ours``: the tokenize+pack stage of ``prepare_dataset`` (orchestra/data/pack.py) after the corpus
  has been read once and the tokenizer exists: ``_encode_corpus`` (``--workers`` spawned processes
  with one tokenizer thread each, fed batches of documents read from the jsonl files by the main
  process) with every document's ids + EOS written through ``ShardWriter`` into the train and val
  splits that ``choose_val_documents`` picks (5 %). Reading the jsonl again, spawning the pool and
  writing the shards are inside the timing; the progress bar is not drawn.
- ``hf-tokenizers``: ``Tokenizer.encode_batch`` of the same tokenizer (``encode_special_tokens``
  on, as ours) over the documents already in memory, in the same batches as ours (512 documents
  or 1 MiB of text), in this process on the Rust thread pool (RAYON_NUM_THREADS=``--workers``,
  TOKENIZERS_PARALLELISM=true); every encoding's ids are taken (``Encoding.ids``), nothing written.
- ``hf-datasets``: ``Dataset.map(batched=True, num_proc=--workers)`` (batch size 1000, the default)
  over the corpus already converted to Arrow (``load_dataset("json")``, untimed), calling a
  transformers ``PreTrainedTokenizerFast`` wrapping the same tokenizer
  (``add_special_tokens=False, return_attention_mask=False``) in each worker process with
  TOKENIZERS_PARALLELISM=false (one thread per process), the ids written to Arrow cache files.

Targets: ours at least 0.80x hf-tokenizers' throughput and at least 1.5x hf-datasets'. tokens/s
counts document tokens (EOS not counted), the same numerator for all three. After the timed
rounds the token ids are checked, document by document: ours (read back from the last round's
shards), hf-datasets (its last Arrow output) and an untimed hf-tokenizers pass must be identical,
else the run exits with status 1 after writing its rows (check=FAIL).

One byte-level BPE (orchestra.data.tokenizer.train_bpe, ``--vocab`` 32000) is trained once on the
first ``--train-mb`` (20) MB of the corpus and cached in ``<work>``.

The pipeline: ``orchestra.data.pipeline.run.run_pipeline`` with the ``web`` preset
(conf/data/pipeline/web.yaml: C4 line cleaning, Gopher repetition and quality, C4 and FineWeb
quality filters, English keep-list, PII, exact and MinHash dedup) and tasks=workers=``--workers``
on the first ``--pipeline-mb`` (20) MB of the corpus, once. Per stage: seconds, documents and MB
in and out (datatrove's stats of the stage's first and last steps; ingest from its own counts),
MB/s of input. Rows are appended to ``--csv`` and markdown tables are printed.
"""

from __future__ import annotations

import argparse
import ast
import datetime as dt
import hashlib
import itertools
import json
import os
import platform
import random
import re
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.benchlib import append_csv  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "data_cpu.csv"
METHODS = ("ours", "hf-tokenizers", "hf-datasets")
TARGETS = {"hf-tokenizers": 0.80, "hf-datasets": 1.5}  # ours' throughput over theirs, at least
MB = 1_000_000
FILE_BYTES = 10 * MB  # text per corpus file
GENERATOR_VERSION = 1  # bump when the generated text changes
CSV_FIELDS = [
    "date", "device", "cores", "python", "tokenizers", "datasets", "transformers", "datatrove", "section",
    "method", "vocab", "workers", "rounds", "documents_in", "documents_out", "mb", "mb_out", "seconds",
    "seconds_all", "cpu_s", "cpu_s_all", "mb_per_s", "tokens", "tokens_per_s", "ratio", "cpu_ratio", "target", "pass",
    "check",
    "load_1min_before", "load_1min_after",
]  # fmt: skip


# --------------------------------------------------------------------------- the corpus

_WORD = re.compile(r"^[(\"']?[A-Za-z][A-Za-z]*(?:['-][A-Za-z]+)*[)\"']?[,;:.!?]?[)\"']?$")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
END = ""  # the chain's end-of-sentence state


def docstring_sentences(max_chars: int | None = None) -> list[list[str]]:
    """Sentences of plain English words from the standard library's docstrings, in file order.

    Paragraphs with code (``>>>``, indented lines, brackets) are skipped; a sentence is kept when
    every word is letters with at most a trailing comma, colon or full stop.
    """
    from orchestra.data.sources import stdlib_corpus

    sentences: list[list[str]] = []
    chars = 0
    for path in stdlib_corpus().files:
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            doc = ast.get_docstring(node)
            if not doc:
                continue
            for para in re.split(r"\n\s*\n", doc):
                if ">>>" in para or re.search(r"^\s", para, re.MULTILINE):
                    continue
                for sentence in _SENTENCE_END.split(" ".join(para.split())):
                    words = sentence.split()
                    kept = [w for w in words if _WORD.match(w)]
                    if len(kept) >= 4 and len(kept) >= 0.8 * len(words) and kept[-1][-1] in ".!?":
                        sentences.append(kept)
                        chars += sum(len(w) + 1 for w in kept)
        if max_chars is not None and chars >= max_chars:
            break
    if not sentences:
        raise RuntimeError("no English sentence found in the standard library's docstrings")
    return sentences


class Prose:
    """A word-bigram chain over sentences: ``sentence()`` draws a new one, ending where sources end."""

    def __init__(self, sentences: list[list[str]], rng: random.Random) -> None:
        self.rng = rng
        succ: dict[str, list[str]] = {}
        self.starts: list[str] = []
        for words in sentences:
            self.starts.append(words[0])
            for a, b in zip(words, [*words[1:], END], strict=True):
                succ.setdefault(a, []).append(b)
        self.succ = succ
        self.words = sorted(succ)

    def sentence(self, max_words: int = 40) -> str:
        rnd = self.rng.random
        word = self.starts[int(rnd() * len(self.starts))]
        out = [word]
        while len(out) < max_words:
            options = self.succ[word]
            word = options[int(rnd() * len(options))]
            if word == END:
                break
            out.append(word)
        text = " ".join(out)
        if len(out) < 4:
            return self.sentence(max_words)
        if text[-1] not in ".!?":
            text = text.rstrip(",;:") + "."
        return text[0].upper() + text[1:]

    def paragraph(self, lo: int = 2, hi: int = 7) -> str:
        return " ".join(self.sentence() for _ in range(self.rng.randint(lo, hi)))

    def title(self) -> str:
        words = self.sentence(max_words=8).rstrip(".!?").split()
        return " ".join(w.capitalize() for w in words[: self.rng.randint(3, 8)])


_MENUS = ("Home | About | Blog | Contact", "Home > Docs > Reference", "Menu Search Sign in Register",
          "Skip to main content")  # fmt: skip
_NOTICES = (
    "This site uses cookies to improve your experience. By continuing you accept our cookie policy.",
    "Please enable JavaScript in your browser to view this page.",
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit.",
)
_FOOTERS = ("Share this page", "Posted in Reference | Leave a comment", "Back to top")


def _pii(rng: random.Random, prose: Prose) -> str:
    user = f"{rng.choice(prose.words).strip('.,;:!?').lower()}.{rng.randint(1, 999)}"
    kind = rng.randrange(3)
    if kind == 0:
        return f"Write to {user}@example.com if you have a question about this page."
    if kind == 1:
        return f"Call us on +1 555 {rng.randint(100, 999)} {rng.randint(1000, 9999)} during office hours."
    return f"The server at 192.0.2.{rng.randint(1, 254)} answers these requests."


def web_documents(seed: int, sentences: list[list[str]]) -> Iterator[str]:
    """An endless, seeded stream of web-like pages with the planted noise (see the module doc)."""
    rng = random.Random(seed)
    prose = Prose(sentences, rng)
    recent: list[str] = []  # earlier pages, for the copies
    while True:
        roll = rng.random()
        if roll < 0.04 and recent:  # an exact copy of an earlier page
            doc = rng.choice(recent)
        elif roll < 0.07 and recent:  # a near copy: a few words changed, a line added
            words = rng.choice(recent).split(" ")
            for _ in range(max(1, len(words) // 50)):
                words[rng.randrange(len(words))] = rng.choice(prose.words)
            doc = " ".join(words) + "\n" + prose.sentence()
        elif roll < 0.10:  # too short to keep
            doc = prose.sentence()
        elif roll < 0.12:  # spam: one sentence over and over
            doc = "\n".join([prose.sentence()] * rng.randint(10, 40))
        elif roll < 0.14:  # letter soup
            letters = "bcdfghjklmnpqrstvwxzaeiouy"
            doc = "\n".join(
                " ".join("".join(rng.choice(letters) for _ in range(rng.randint(2, 11))) for _ in range(12))
                + "."
                for _ in range(rng.randint(5, 30))
            )
        else:
            lines = [prose.title()]
            if rng.random() < 0.3:
                lines.insert(0, rng.choice(_MENUS))
            lines += [prose.paragraph() for _ in range(rng.randint(2, 12))]
            if rng.random() < 0.1:
                lines.insert(rng.randint(1, len(lines)), _pii(rng, prose))
            if rng.random() < 0.05:
                lines.append(rng.choice(_NOTICES))
            if rng.random() < 0.2:
                lines.append(rng.choice(_FOOTERS))
            doc = "\n".join(lines)
            recent.append(doc)
            if len(recent) > 500:
                recent.pop(rng.randrange(len(recent)))
        yield doc


@dataclass
class CorpusInfo:
    """The generated corpus: its jsonl files, documents and bytes of text."""

    folder: Path
    files: list[Path]
    documents: int
    bytes: int
    seed: int

    def to_dict(self) -> dict[str, Any]:
        return {"files": [p.name for p in self.files], "documents": self.documents, "bytes": self.bytes,
                "seed": self.seed, "version": GENERATOR_VERSION, "python": platform.python_version()}  # fmt: skip


def make_corpus(folder: Path, mb: float, seed: int) -> CorpusInfo:
    """``mb`` MB of generated pages as jsonl in ``folder``; an earlier corpus of the same recipe is reused."""
    target = int(mb * MB)
    marker = folder / "corpus.json"
    if marker.is_file():
        old = json.loads(marker.read_text())
        want = {
            "target_bytes": target,
            "seed": seed,
            "version": GENERATOR_VERSION,
            "python": platform.python_version(),
        }
        if {k: old.get(k) for k in want} == want:
            return CorpusInfo(
                folder, [folder / n for n in old["files"]], old["documents"], old["bytes"], seed
            )
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    # Enough source sentences for the size (all of them from ~10 MB up): a tiny corpus starts faster.
    sentences = docstring_sentences(max_chars=None if mb >= 10 else int(100_000 + mb * 50_000))
    files: list[Path] = []
    documents = total = in_file = 0
    fh = None
    try:
        for n, doc in enumerate(web_documents(seed, sentences)):
            if fh is None or in_file >= FILE_BYTES:
                if fh is not None:
                    fh.close()
                files.append(folder / f"part-{len(files):04d}.jsonl")
                fh = files[-1].open("w", encoding="utf-8")
                in_file = 0
            size = len(doc.encode("utf-8"))
            fh.write(json.dumps({"id": f"doc-{n:08d}", "text": doc}, ensure_ascii=False) + "\n")
            documents, total, in_file = documents + 1, total + size, in_file + size
            if total >= target:
                break
    finally:
        if fh is not None:
            fh.close()
    info = CorpusInfo(folder, files, documents, total, seed)
    marker.write_text(json.dumps({"target_bytes": target, **info.to_dict()}, indent=1) + "\n")
    return info


def read_documents(files: Sequence[Path], max_bytes: float | None = None) -> list[str]:
    """The documents' texts in corpus order (up to ``max_bytes`` of text when given)."""
    docs: list[str] = []
    total = 0
    for path in files:
        with path.open(encoding="utf-8") as fh:
            for line in fh:
                docs.append(json.loads(line)["text"])
                total += len(docs[-1].encode("utf-8"))
                if max_bytes is not None and total >= max_bytes:
                    return docs
    return docs


# --------------------------------------------------------------------------- tokenization


@dataclass
class Setup:
    """What every method shares: the corpus (as files, in memory and as Arrow) and the tokenizer."""

    work: Path
    info: CorpusInfo
    docs: list[str]
    tokenizer: Any  # tokenizers.Tokenizer, encode_special_tokens on
    tokenizer_json: str
    eos_id: int
    vocab: int
    dtype: Any  # np.dtype of the shards
    val_docs: set[int]
    workers: int
    dataset: Any = None  # datasets.Dataset of the jsonl files
    outputs: dict[str, Path] = field(default_factory=dict)  # method -> its last round's output


@dataclass
class Timing:
    method: str
    round: int
    seconds: float
    cpu_seconds: float  # this process's and its exited children's
    documents: int
    tokens: int


def train_tokenizer(work: Path, info: CorpusInfo, vocab: int, train_mb: float) -> str:
    """tokenizer.json of a byte-level BPE trained on the first ``train_mb`` MB (cached in ``work``)."""
    from orchestra.data.tokenizer import train_bpe

    key = f"vocab{vocab}-train{train_mb:g}mb-corpus{info.bytes}-seed{info.seed}-v{GENERATOR_VERSION}"
    path = work / f"tokenizer-{key}.json"
    if not path.is_file():
        docs = read_documents(info.files, train_mb * MB)
        path.write_text(train_bpe(docs, vocab, num_documents=len(docs)).to_str())
    return path.read_text()


def prepare(work: Path, info: CorpusInfo, vocab: int, train_mb: float, workers: int, seed: int) -> Setup:
    """Read the corpus (untimed: prepare_dataset reads it once before tokenizing), train or load the tokenizer."""
    import numpy as np
    from tokenizers import Tokenizer

    from orchestra.data.pack import choose_val_documents
    from orchestra.data.shards import token_dtype
    from orchestra.data.tokenizer import find_eos, vocab_size_of

    tokenizer_json = train_tokenizer(work, info, vocab, train_mb)
    tokenizer = Tokenizer.from_str(tokenizer_json)
    tokenizer.encode_special_tokens = True  # as ours: a literal "<|endoftext|>" is text
    _, eos_id = find_eos(tokenizer)
    docs = read_documents(info.files)
    val_docs = choose_val_documents([len(d) for d in docs], 0.05, seed)
    assert val_docs is not None
    size = vocab_size_of(tokenizer)
    return Setup(work, info, docs, tokenizer, tokenizer_json, eos_id, size, np.dtype(token_dtype(size)),
                 val_docs, workers)  # fmt: skip


def cpu_seconds() -> float:
    """User + system CPU seconds of this process (every thread) and of its children that have exited."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class Clock:
    """Wall and CPU seconds since it was made; a method's worker processes have exited when it stops."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), cpu_seconds()

    def stop(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, cpu_seconds() - self.cpu


def run_ours(setup: Setup, out: Path) -> tuple[float, float, int, int]:
    """pack.py's tokenize+pack: _encode_corpus over the jsonl files, ids + EOS into train/val ShardWriters."""
    from orchestra.data.pack import _encode_corpus
    from orchestra.data.shards import SPLITS, ShardWriter
    from orchestra.data.sources import Corpus

    corpus = Corpus("files", "bench corpus", list(setup.info.files))
    out.mkdir(parents=True)
    tokens = documents = 0
    clock = Clock()
    writers = {split: ShardWriter(out, split, setup.dtype, 16_777_216) for split in SPLITS}
    for index, ids in _encode_corpus(corpus, setup.tokenizer_json, setup.eos_id, setup.dtype, setup.workers):
        writers["val" if index in setup.val_docs else "train"].write(ids, documents=1)
        tokens += len(ids) - 1
        documents += 1
    for writer in writers.values():
        writer.close()
    return (*clock.stop(), documents, tokens)


def batches(docs: Sequence[str]) -> Iterator[list[str]]:
    """The documents in ours' batches (pack.batched_documents: the same cut points)."""
    from orchestra.data.pack import batched_documents

    for batch in batched_documents(docs):
        yield [text for _, text in batch]


def run_hf_tokenizers(setup: Setup) -> tuple[float, float, int, int]:
    """Tokenizer.encode_batch in this process, on the Rust thread pool; every encoding's ids taken."""
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    tokens = documents = 0
    clock = Clock()
    for batch in batches(setup.docs):
        for encoding in setup.tokenizer.encode_batch(batch, add_special_tokens=False):
            tokens += len(encoding.ids)
            documents += 1
    return (*clock.stop(), documents, tokens)


def hf_tokenize(batch: dict[str, list[str]], tokenizer: Any) -> dict[str, Any]:
    """The map function: the usual ``tokenizer(batch["text"])``, ids only."""
    return {
        "input_ids": tokenizer(batch["text"], add_special_tokens=False, return_attention_mask=False)[
            "input_ids"
        ]
    }


def load_arrow(setup: Setup) -> Any:
    """The corpus as a datasets.Dataset (converted to Arrow once, untimed, cached under ``<work>/hf``)."""
    import datasets

    datasets.disable_progress_bars()
    return datasets.load_dataset(
        "json", data_files=[str(p) for p in setup.info.files], split="train", cache_dir=str(setup.work / "hf")
    )


def run_hf_datasets(setup: Setup, out: Path) -> tuple[float, float, int, int]:
    """Dataset.map(batched=True, num_proc=workers) with PreTrainedTokenizerFast, one thread per process."""
    from transformers import PreTrainedTokenizerFast

    if setup.dataset is None:
        setup.dataset = load_arrow(setup)
    out.mkdir(parents=True)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # read by each (forked) worker: one thread each
    try:
        clock = Clock()
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=setup.tokenizer)
        mapped = setup.dataset.map(
            hf_tokenize, batched=True, num_proc=setup.workers, remove_columns=["id", "text"],
            fn_kwargs={"tokenizer": tokenizer}, cache_file_name=str(out / "tokenized.arrow"),
            load_from_cache_file=False,
        )  # fmt: skip
        seconds, cpu = clock.stop()
    finally:
        os.environ["TOKENIZERS_PARALLELISM"] = "true"
    lengths = _arrow_lengths(mapped)
    return seconds, cpu, len(lengths), int(lengths.sum())


def _arrow_lengths(dataset: Any) -> Any:
    import numpy as np
    import pyarrow.compute as pc

    column = dataset.data.column("input_ids")
    return np.concatenate([pc.list_value_length(chunk).to_numpy() for chunk in column.chunks])


def rounds_order(rounds: int) -> list[list[str]]:
    """Method order per round, rotated: A B C, B C A, C A B, A B C, ..."""
    return [list(METHODS[r % 3 :] + METHODS[: r % 3]) for r in range(rounds)]


def run_round(setup: Setup, method: str, r: int) -> Timing:
    out = setup.work / "runs" / f"{method}-{r}"
    shutil.rmtree(out, ignore_errors=True)
    previous = setup.outputs.get(method)
    if method == "ours":
        seconds, cpu, documents, tokens = run_ours(setup, out)
    elif method == "hf-tokenizers":
        seconds, cpu, documents, tokens = run_hf_tokenizers(setup)
    else:
        seconds, cpu, documents, tokens = run_hf_datasets(setup, out)
    if previous is not None and previous != out:
        shutil.rmtree(previous, ignore_errors=True)  # only the last round's output is kept, for the check
    setup.outputs[method] = out
    return Timing(method, r, seconds, cpu, documents, tokens)


# --------------------------------------------------------------------------- the token check


def _digest(ids: Any) -> bytes:
    import numpy as np

    return hashlib.blake2b(np.asarray(ids, dtype=np.uint32).tobytes(), digest_size=8).digest()


def ours_documents(setup: Setup) -> list[bytes]:
    """Each document's digest from ours' last shards (documents end at EOS, in corpus order)."""
    import numpy as np

    out = setup.outputs["ours"]
    streams = {}
    for split in ("train", "val"):
        files = sorted(out.glob(f"{split}-*.bin"))
        parts = [np.fromfile(f, dtype=setup.dtype) for f in files]
        stream = np.concatenate(parts) if parts else np.empty(0, setup.dtype)
        ends = np.flatnonzero(stream == setup.eos_id)
        starts = np.concatenate([[0], ends[:-1] + 1])
        streams[split] = iter([stream[a:b] for a, b in zip(starts, ends, strict=True)])
    digests = []
    for index in range(len(setup.docs)):
        piece = next(streams["val" if index in setup.val_docs else "train"], None)
        if piece is None:
            break
        digests.append(_digest(piece))
    return digests


def datasets_documents(setup: Setup) -> list[bytes]:
    """Each document's digest from hf-datasets' last Arrow files (its worker shards, in order)."""
    import datasets

    files = sorted(setup.outputs["hf-datasets"].glob("*.arrow"))  # tokenized_0000i_of_0000n.arrow
    mapped = datasets.concatenate_datasets([datasets.Dataset.from_file(str(f)) for f in files])
    digests = []
    for chunk in mapped.data.column("input_ids").chunks:
        offsets = chunk.offsets.to_numpy()
        values = chunk.values.to_numpy()
        digests += [_digest(values[a:b]) for a, b in itertools.pairwise(offsets)]
    return digests


def tokenizers_documents(setup: Setup) -> list[bytes]:
    return [
        _digest(e.ids)
        for batch in batches(setup.docs)
        for e in setup.tokenizer.encode_batch(batch, add_special_tokens=False)
    ]


def check_tokens(setup: Setup) -> dict[str, int]:
    """Documents whose ids differ from the hf-tokenizers pass (a document missing counts as differing)."""
    reference = tokenizers_documents(setup)
    out = {}
    for method, digests in (("ours", ours_documents(setup)), ("hf-datasets", datasets_documents(setup))):
        same = sum(a == b for a, b in zip(reference, digests, strict=False))
        out[method] = len(reference) - same + abs(len(digests) - len(reference))
    out["hf-tokenizers"] = 0
    return out


# --------------------------------------------------------------------------- the pipeline


@dataclass
class StageRow:
    name: str
    seconds: float
    documents_in: int | None
    documents_out: int | None
    mb_in: float | None
    mb_out: float | None

    @property
    def mb_per_s(self) -> float | None:
        return self.mb_in / self.seconds if self.mb_in and self.seconds > 0 else None


def web_pipeline(workers: int) -> Any:
    """The web preset (conf/data/pipeline/web.yaml) as a PipelineConfig, with tasks = workers = ``workers``."""
    from omegaconf import OmegaConf

    from orchestra.cli.common import CONF_DIR
    from orchestra.config import PipelineConfig

    node = OmegaConf.merge(
        OmegaConf.structured(PipelineConfig),
        OmegaConf.load(Path(CONF_DIR) / "data" / "pipeline" / "web.yaml"),
    )
    pipeline = OmegaConf.to_object(node)
    assert isinstance(pipeline, PipelineConfig)
    pipeline.tasks = pipeline.workers = workers
    return pipeline


def run_web_pipeline(
    work: Path, info: CorpusInfo, mb: float, workers: int, seed: int
) -> tuple[list[StageRow], Any]:
    """run_pipeline with the web preset on the corpus's first ``mb`` MB; one row per stage and one for all."""
    from orchestra.config import DataConfig, DataSource
    from orchestra.data.pipeline.run import run_pipeline

    folder = work / "pipeline-input"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    docs = read_documents(info.files, mb * MB)
    text_bytes = sum(len(d.encode("utf-8")) for d in docs)
    with (folder / "web.jsonl").open("w", encoding="utf-8") as fh:
        for n, doc in enumerate(docs):
            fh.write(json.dumps({"id": f"doc-{n:08d}", "text": doc}, ensure_ascii=False) + "\n")
    cfg = DataConfig(name="bench-data", source=DataSource.files, paths=[str(folder / "web.jsonl")],
                     cache_dir=str(work / "cache"), pipeline=web_pipeline(workers))  # fmt: skip
    cfg.validate("data")
    out = work / "pipeline-run"
    shutil.rmtree(out, ignore_errors=True)  # skip_completed would reuse a previous run's tasks
    start = time.perf_counter()
    result = run_pipeline(cfg, out, seed, log=lambda line: print(f"pipeline: {line}", flush=True))
    wall = time.perf_counter() - start
    rows = []
    flows = [s.flow() for s in result.stages]
    for i, (stage, flow) in enumerate(zip(result.stages, flows, strict=True)):
        if stage.name == "ingest":
            counts = list(result.ingest.values())
            read = sum(c.documents for c in counts)
            kept = sum(c.documents - c.subset_dropped for c in counts)
            after = flows[i + 1].get("chars_in") if i + 1 < len(flows) else None
            rows.append(
                StageRow("ingest", stage.seconds, read, kept, text_bytes / MB, after / MB if after else None)
            )
            continue
        chars_in, chars_out = flow.get("chars_in", 0), flow.get("chars_out", 0)
        # Stages that read buckets or clusters rather than documents count none: left blank.
        rows.append(StageRow(stage.name, stage.seconds, flow.get("documents_in") or None,
                             flow.get("documents_out") or None, chars_in / MB if chars_in else None,
                             chars_out / MB if chars_out else None))  # fmt: skip
    kept_chars = sum(len(r["text"]) for r in _kept_records(result.kept))
    rows.append(
        StageRow(
            "pipeline (all stages)", wall, len(docs), result.kept_documents, text_bytes / MB, kept_chars / MB
        )
    )
    return rows, result


def _kept_records(folder: Path) -> Iterator[dict[str, Any]]:
    import gzip

    for path in sorted(folder.rglob("*.jsonl.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    yield json.loads(line)


def step_rows(result: Any) -> list[tuple[str, str, float, int | None]]:
    """(stage, step, seconds summed over the stage's tasks, documents it saw) from datatrove's stats."""
    rows = []
    for stage in result.stages:
        for step in stage.stats:
            seconds = float((step.get("time_stats") or {}).get("total", 0.0))
            stats = step.get("stats") or {}
            seen = stats.get("total", stats.get("documents"))
            seen = seen.get("total") if isinstance(seen, dict) else seen
            rows.append(
                (stage.name, _plain(str(step.get("name", "?"))), seconds, int(seen) if seen else None)
            )
    return rows


def _plain(name: str) -> str:
    """datatrove's step name without its emoji: "🔻 - FILTER: 👯 Gopher Repetition" -> "FILTER: Gopher Repetition"."""
    ascii_only = "".join(c for c in name if ord(c) < 0x2000)
    return " ".join(ascii_only.replace(" - ", " ").split())


# --------------------------------------------------------------------------- output


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("tokenizers", "datasets", "transformers", "datatrove"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = ""
    return out


GIVEN = {
    "ours": "{w} spawned processes x 1 tokenizer thread; main process reads the jsonl and writes the shards",
    "hf-tokenizers": "1 process, Rust thread pool of {w} threads (RAYON_NUM_THREADS={w}); documents in memory",
    "hf-datasets": "num_proc={w} processes x 1 thread, PreTrainedTokenizerFast; corpus already in Arrow",
}


@dataclass
class MethodResult:
    method: str
    seconds: list[float]
    cpu_seconds: list[float]
    documents: int
    tokens: int
    mb: float
    mismatches: int = 0

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu_seconds)


def ratio_of(ours: MethodResult, other: MethodResult) -> float:
    """Ours' throughput over the other's, on the same documents: the other's seconds over ours."""
    return other.median / ours.median


def cpu_ratio_of(ours: MethodResult, other: MethodResult) -> float:
    """The same from CPU seconds (all processes and threads): less moved by other jobs' load."""
    return other.cpu_median / ours.cpu_median


def tokenize_table(results: dict[str, MethodResult], workers: int) -> str:
    head = ["method", "what it gets", "MB", "documents", "tokens", "seconds (median)", "MB/s", "tokens/s",
            "ours / this", "target", "pass", "CPU s (median)", "ours / this (CPU time)", "ids vs hf-tokenizers"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ours = results["ours"]
    for name in METHODS:
        r = results[name]
        ratio = "" if name == "ours" else f"**{ratio_of(ours, r):.3f}**"
        cpu_ratio = "" if name == "ours" else f"{cpu_ratio_of(ours, r):.3f}"
        target = f">= {TARGETS[name]:g}" if name in TARGETS else ""
        passed = "" if name == "ours" else ("pass" if ratio_of(ours, r) >= TARGETS[name] else "FAIL")
        check = "identical" if r.mismatches == 0 else f"{r.mismatches} documents differ"
        lines.append(
            f"| {name} | {GIVEN[name].format(w=workers)} | {r.mb:,.1f} | {r.documents:,} | {r.tokens:,} | "
            f"{r.median:.2f} | {r.mb / r.median:,.2f} | {r.tokens / r.median:,.0f} | {ratio} | {target} | {passed} | "
            f"{r.cpu_median:.1f} | {cpu_ratio} | {check} |"
        )
    return "\n".join(lines)


def pipeline_table(rows: Sequence[StageRow], tasks: dict[str, int]) -> str:
    head = ["stage", "tasks", "seconds", "documents in", "documents out", "MB in", "MB out", "MB/s (in)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def num(value: float | None, fmt: str) -> str:
        return "" if value is None else format(value, fmt)

    for r in rows:
        lines.append(
            f"| {r.name} | {tasks.get(r.name, '')} | {r.seconds:.1f} | {num(r.documents_in, ',')} | "
            f"{num(r.documents_out, ',')} | {num(r.mb_in, '.2f')} | {num(r.mb_out, '.2f')} | {num(r.mb_per_s, '.3f')} |"
        )
    return "\n".join(lines)


def steps_table(steps: Sequence[tuple[str, str, float, int | None]]) -> str:
    lines = ["| stage | step | seconds (all tasks) | documents |", "|---|---|---|---|"]
    for stage, step, seconds, seen in steps:
        if seconds >= 0.05:
            lines.append(f"| {stage} | {step} | {seconds:.1f} | {'' if seen is None else f'{seen:,}'} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mb", type=float, default=100.0, help="corpus size, MB of document text")
    parser.add_argument(
        "--pipeline-mb", type=float, default=20.0, help="MB through data.pipeline (0: skip it)"
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="timed runs per tokenization method, interleaved"
    )
    parser.add_argument("--workers", type=int, default=2, help="processes or threads every method gets")
    parser.add_argument("--vocab", type=int, default=32000, help="BPE vocabulary")
    parser.add_argument(
        "--train-mb", type=float, default=20.0, help="MB of the corpus the tokenizer is trained on"
    )
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument(
        "--work", type=Path, default=None, help="corpus, tokenizer and outputs (default: a temp dir)"
    )
    parser.add_argument("--csv", type=Path, default=RESULTS, help="rows are appended here")
    args = parser.parse_args(argv)
    for key in ("mb", "rounds", "workers", "vocab", "train_mb"):
        if getattr(args, key) <= 0:
            parser.error(f"--{key.replace('_', '-')} must be positive")
    if args.pipeline_mb < 0:
        parser.error("--pipeline-mb must be >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    # Before tokenizers starts its thread pool (on first use in this process): hf-tokenizers' budget.
    os.environ["RAYON_NUM_THREADS"] = str(args.workers)
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    temporary = args.work is None
    work = Path(tempfile.mkdtemp(prefix="orchestra-bench-data-")) if temporary else args.work
    work.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    try:
        return _main(args, work, began)
    finally:
        shutil.rmtree(work / "runs", ignore_errors=True)
        if temporary:
            shutil.rmtree(work, ignore_errors=True)


def _main(args: argparse.Namespace, work: Path, began: float) -> dict[str, Any]:
    info = make_corpus(work / "corpus", args.mb, args.seed)
    print(f"corpus: {info.documents:,} documents, {info.bytes / MB:.1f} MB in {len(info.files)} files "
          f"({work / 'corpus'}), {time.perf_counter() - began:.0f} s", flush=True)  # fmt: skip
    setup = prepare(work, info, args.vocab, args.train_mb, args.workers, args.seed)
    setup.dataset = load_arrow(setup)
    print(f"tokenizer: vocab {setup.vocab} trained on {min(args.train_mb, args.mb):g} MB; corpus in memory and "
          f"in Arrow; {time.perf_counter() - began:.0f} s", flush=True)  # fmt: skip

    load_before = os.getloadavg()[0]
    timings: list[Timing] = []
    for r, order in enumerate(rounds_order(args.rounds)):
        for method in order:
            t = run_round(setup, method, r)
            timings.append(t)
            print(
                f"round {r} {method}: {t.seconds:.2f} s, {t.documents:,} documents, {t.tokens:,} tokens",
                flush=True,
            )
    load_after = os.getloadavg()[0]

    results = {}
    for method in METHODS:
        mine = [t for t in timings if t.method == method]
        counts = {(t.documents, t.tokens) for t in mine}
        if len(counts) != 1:
            raise RuntimeError(f"{method}: the rounds counted different documents/tokens: {sorted(counts)}")
        documents, tokens = counts.pop()
        results[method] = MethodResult(
            method,
            [t.seconds for t in mine],
            [t.cpu_seconds for t in mine],
            documents,
            tokens,
            info.bytes / MB,
        )
    for method, mismatches in check_tokens(setup).items():
        results[method].mismatches = mismatches
    for r in results.values():  # the same documents must give the same token count
        if (r.documents, r.tokens) != (info.documents, results["hf-tokenizers"].tokens):
            r.mismatches = max(r.mismatches, 1)

    rows_pipeline: list[StageRow] = []
    steps: list[tuple[str, str, float, int | None]] = []
    tasks: dict[str, int] = {}
    if args.pipeline_mb > 0:
        rows_pipeline, result = run_web_pipeline(work, info, args.pipeline_mb, args.workers, args.seed)
        steps = step_rows(result)
        tasks = {s.name: s.tasks for s in result.stages}
        shutil.rmtree(work / "pipeline-run", ignore_errors=True)

    device = f"{cpu_model()} ({cores()} cores)"
    date = dt.date.today().isoformat()
    base = {"date": date, "device": device, "cores": cores(), **versions(), "vocab": setup.vocab,
            "workers": args.workers, "rounds": args.rounds, "load_1min_before": round(load_before, 2),
            "load_1min_after": round(load_after, 2)}  # fmt: skip
    csv_rows = []
    ours = results["ours"]
    for method in METHODS:
        r = results[method]
        ratio = None if method == "ours" else ratio_of(ours, r)
        csv_rows.append({
            **base, "section": "tokenize", "method": method, "documents_in": r.documents, "documents_out": r.documents,
            "mb": round(r.mb, 3), "seconds": round(r.median, 3), "seconds_all": " ".join(f"{s:.3f}" for s in r.seconds),
            "cpu_s": round(r.cpu_median, 3), "cpu_s_all": " ".join(f"{s:.3f}" for s in r.cpu_seconds),
            "cpu_ratio": "" if ratio is None else round(cpu_ratio_of(ours, r), 4),
            "mb_per_s": round(r.mb / r.median, 3), "tokens": r.tokens, "tokens_per_s": round(r.tokens / r.median, 1),
            "ratio": "" if ratio is None else round(ratio, 4), "target": TARGETS.get(method, ""),
            "pass": "" if ratio is None else ("pass" if ratio >= TARGETS[method] else "FAIL"),
            "check": "ok" if r.mismatches == 0 else f"FAIL ({r.mismatches} documents differ)",
        })  # fmt: skip
    for row in rows_pipeline:
        csv_rows.append({
            **base, "section": "pipeline", "method": row.name, "documents_in": row.documents_in,
            "documents_out": row.documents_out, "mb": None if row.mb_in is None else round(row.mb_in, 3),
            "mb_out": None if row.mb_out is None else round(row.mb_out, 3), "seconds": round(row.seconds, 3),
            "mb_per_s": None if row.mb_per_s is None else round(row.mb_per_s, 4), "workers": tasks.get(row.name, args.workers),
        })  # fmt: skip
    append_csv(args.csv, CSV_FIELDS, csv_rows)

    v = versions()
    print(f"\nDevice: {device} — {date} — Python {v['python']}, tokenizers {v['tokenizers']}, datasets "
          f"{v['datasets']}, transformers {v['transformers']}, datatrove {v['datatrove']}")  # fmt: skip
    print(f"Tokenization: {info.bytes / MB:.1f} MB, {info.documents:,} documents, vocab {setup.vocab}, "
          f"{args.workers} workers; median of {args.rounds} interleaved rounds; 1-min load average "
          f"{load_before:.2f} before, {load_after:.2f} after\n")  # fmt: skip
    print(tokenize_table(results, args.workers))
    if rows_pipeline:
        print(
            f"\nPipeline (web preset, tasks = workers = {args.workers}) on {rows_pipeline[-1].mb_in:.1f} MB:\n"
        )
        print(pipeline_table(rows_pipeline, tasks))
        print("\nWhere the filter and dedup time goes (datatrove's per-step time, summed over tasks):\n")
        print(steps_table(steps))
    print(f"\nappended to {args.csv}; {time.perf_counter() - began:.0f} s in all")
    for method in ("hf-tokenizers", "hf-datasets"):
        ratio = ratio_of(ours, results[method])
        if ratio < TARGETS[method]:
            print(
                f"BELOW TARGET: ours / {method} = {ratio:.3f} (target {TARGETS[method]:g})", file=sys.stderr
            )
    failed = [r for r in results.values() if r.mismatches]
    if failed:
        for r in failed:
            print(
                f"TOKEN CHECK FAILED: {r.method}: {r.mismatches} documents' ids differ from hf-tokenizers'",
                file=sys.stderr,
            )
        raise SystemExit(1)
    return {"results": results, "pipeline": rows_pipeline, "steps": steps, "csv": args.csv}


if __name__ == "__main__":
    main()
