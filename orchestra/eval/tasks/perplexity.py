"""perplexity: token-weighted perplexity and bits per byte of documents, each scored on its own.

Documents come from txt / jsonl files (``paths``) or the val split of a prepared dataset
(``dataset``: its token stream split at EOS, after checking the model reads the dataset's
tokenizer). A document longer than the context is scored in rolling windows (``stride``).
Bits per byte divide the summed negative log-likelihood (in bits) by the documents' UTF-8
bytes, so models with different tokenizers can be compared.
"""

from __future__ import annotations

import glob
import math
from pathlib import Path

import numpy as np

from orchestra.config import EvalConfig
from orchestra.data.tasks.formats import read_records
from orchestra.eval.model import EvalModel
from orchestra.eval.scoring import score_documents
from orchestra.eval.tasks.spec import EvalDataError, EvalTask, Paired, Ranks, TaskResult, limited


def _files(patterns: list[str]) -> list[Path]:
    files: list[Path] = []
    for pattern in patterns:
        found = sorted(Path(p) for p in glob.glob(pattern)) or (
            [Path(pattern)] if Path(pattern).is_file() else []
        )
        if not found:
            raise EvalDataError(f"paths: {pattern!r} matches no file")
        files += found
    return files


def file_documents(patterns: list[str], text_field: str) -> list[str]:
    """One document per .txt file, one per jsonl record (its ``text_field``); empty ones are skipped."""
    docs: list[str] = []
    for path in _files(patterns):
        if path.suffix == ".jsonl":
            for where, record in read_records(path):
                text = record.get(text_field)
                if not isinstance(text, str):
                    raise EvalDataError(f"{where}: no string field {text_field!r} (set text_field)")
                docs.append(text)
        else:
            docs.append(path.read_text(encoding="utf-8"))
    return [d for d in docs if d.strip()]


def dataset_documents(dataset: str, evaluated: EvalModel) -> list[list[int]]:
    """The val split of a prepared dataset as token documents (split at its EOS)."""
    from tokenizers import Tokenizer

    from orchestra.data.shards import load_manifest, split_shards, stored_dtype

    manifest = load_manifest(dataset)
    if "val" not in manifest["splits"]:
        raise EvalDataError(f"dataset: {dataset} has no val split")
    theirs = Tokenizer.from_file(str(Path(dataset) / manifest["tokenizer"]["file"]))
    if theirs.get_vocab() != evaluated.tokenizer.get_vocab():
        raise EvalDataError(
            f"dataset: {dataset} was tokenized with another tokenizer than {evaluated.source}'s "
            f"(their vocabularies differ: {theirs.get_vocab_size()} vs {evaluated.tokenizer.get_vocab_size()} "
            "tokens); prepare the data with the model's tokenizer.json (data.tokenizer_path) or give paths= text files"
        )
    tokens = np.concatenate(
        [
            np.fromfile(f, dtype=stored_dtype(manifest), count=n)
            for f, n in split_shards(dataset, manifest, "val")
        ]
    ).astype(np.int64)
    eos = int(manifest["eos_id"])
    cuts = np.flatnonzero(tokens == eos)
    docs, start = [], 0
    for cut in [*cuts.tolist(), len(tokens)]:
        if cut > start:
            docs.append(tokens[start:cut].tolist() + ([eos] if cut < len(tokens) else []))
        start = cut + 1
    return docs


def run(evaluated: EvalModel, cfg: EvalConfig, ranks: Ranks) -> TaskResult:
    if cfg.paths:
        texts = limited(file_documents(cfg.paths, cfg.text_field), cfg.limit)
        docs = [evaluated.encode(t, add_special_tokens=False) for t in texts]
        source = f"{len(cfg.paths)} path(s)"
    elif cfg.dataset:
        docs = limited(dataset_documents(cfg.dataset, evaluated), cfg.limit)
        texts = [evaluated.decode(d) for d in docs]
        source = f"{cfg.dataset} val split"
    else:
        raise EvalDataError(
            "perplexity: give paths=[...] (txt/jsonl files) or dataset=<prepared dataset folder>"
        )
    pairs = [(d, t) for d, t in zip(docs, texts, strict=True) if d]
    if not pairs:
        raise EvalDataError(f"perplexity: {source} holds no non-empty document")
    mine = ranks.shard(pairs)
    scored = score_documents(
        evaluated.model, [d for _, (d, _) in mine], evaluated.prefix_id, cfg.batch_size, cfg.stride
    )
    records = [
        (
            i,
            {
                "doc": i,
                "logprob": s.logprob,
                "tokens": s.tokens,
                "bytes": len(text.encode("utf-8")),
                "nll": -s.logprob / s.tokens,
            },
        )
        for (i, (_, text)), s in zip(mine, scored, strict=True)
    ]
    samples = ranks.gather(records)
    nll = -sum(r["logprob"] for r in samples)
    tokens = sum(r["tokens"] for r in samples)
    n_bytes = sum(r["bytes"] for r in samples)
    metrics = {
        "nll": nll / tokens,
        "ppl": math.exp(nll / tokens),
        "bits_per_byte": nll / math.log(2) / n_bytes,
        "documents": float(len(samples)),
        "tokens": float(tokens),
    }
    return TaskResult(
        metrics,
        samples,
        paired={"nll": Paired("nll", higher_is_better=False, weight="tokens")},
        details={"source": source, "stride": cfg.stride},
    )


TASK = EvalTask(name="perplexity", run=run)
