"""The on-disk format of a prepared dataset, both halves: writing shards + manifest, and checking them.

Layout of a prepared dataset directory::

    manifest.json        format, dtype, vocab, EOS, tokenizer sha256, provenance, shards, counts
    tokenizer.json       the tokenizer every shard was encoded with
    train-00000.bin ...  raw little-endian uint16 (uint32 when ids exceed 65535) token ids
    val-00000.bin ...

Each split's shards concatenate, in file order, to that split's token stream. The manifest lists
every shard with its token count and sha256 and is written last, after the shards are on disk,
so its presence marks a complete dataset. Writer and reader live together here so a format
change is one edit and one :data:`FORMAT_VERSION` bump.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from orchestra.config import ConfigError
from orchestra.data.errors import DataError
from orchestra.data.tokenizer import TOKENIZER_FILE, file_sha256
from orchestra.io import atomic_write_text

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
SPLITS = ("train", "val")
# What a reader needs; the rest of the manifest records how the dataset was made.
_REQUIRED_KEYS = ("format_version", "dtype", "vocab_size", "eos_id", "tokenizer", "splits")


# --------------------------------------------------------------------------- writing


def token_dtype(vocab_size: int) -> np.dtype:
    """Little-endian uint16 while every id (0..vocab_size-1) fits in 16 bits, else uint32."""
    if vocab_size <= 0:
        raise DataError(f"vocab size must be positive, got {vocab_size}")
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


class ShardWriter:
    """Appends token ids to ``<split>-NNNNN.bin`` files of at most ``shard_tokens`` ids each."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        if shard_tokens <= 0:
            raise ConfigError(f"data.shard_tokens: must be positive, got {shard_tokens}")
        self.directory, self.split, self.dtype, self.shard_tokens = directory, split, dtype, shard_tokens
        self.shards: list[dict[str, Any]] = []
        self.tokens = 0
        self.documents = 0
        self._fh: BinaryIO | None = None
        self._hash: Any = None
        self._in_shard = 0

    def write(self, ids: np.ndarray, documents: int = 0) -> None:
        ids = np.asarray(ids)
        self.documents += documents
        while ids.size:
            if self._fh is None or self._in_shard == self.shard_tokens:
                self._roll()
            assert self._fh is not None
            take = min(ids.size, self.shard_tokens - self._in_shard)
            data = ids[:take].astype(self.dtype, copy=False).tobytes()
            self._fh.write(data)
            self._hash.update(data)
            self._in_shard += take
            self.tokens += take
            ids = ids[take:]

    def _roll(self) -> None:
        self._finish_shard()
        name = f"{self.split}-{len(self.shards):05d}.bin"
        self._fh = open(self.directory / name, "wb")  # noqa: SIM115 -- closed in _finish_shard
        self._hash = hashlib.sha256()
        self._in_shard = 0
        self.shards.append({"file": name, "tokens": 0, "sha256": ""})

    def _finish_shard(self) -> None:
        if self._fh is None:
            return
        self._fh.close()
        self.shards[-1].update(tokens=self._in_shard, sha256=self._hash.hexdigest())
        self._fh = None

    def close(self) -> dict[str, Any]:
        """The split's manifest entry: token and document counts and its shards."""
        self._finish_shard()
        return {"tokens": self.tokens, "documents": self.documents, "shards": list(self.shards)}


def write_manifest(
    directory: Path,
    *,
    dtype: np.dtype,
    vocab_size: int,
    eos_id: int,
    eos_token: str,
    tokenizer: Mapping[str, Any],
    splits: Mapping[str, Mapping[str, Any]],
    provenance: Mapping[str, Any],
    stats: Mapping[str, Any],
) -> None:
    """Flush every file of ``directory`` to disk, then write its manifest (which marks it complete).

    ``splits`` are the :meth:`ShardWriter.close` entries; ``tokenizer`` adds facts about the
    tokenizer (its file and sha256 are recorded here); ``provenance`` (how the data was chosen)
    and ``stats`` are kept for people and for reuse checks, and are not read back by this module.
    """
    manifest = {
        "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "dtype": dtype.name,
        "byte_order": "little",
        "vocab_size": vocab_size,
        "eos_id": eos_id,
        "eos_token": eos_token,
        "tokenizer": {
            "file": TOKENIZER_FILE,
            "sha256": file_sha256(directory / TOKENIZER_FILE),
            **tokenizer,
        },
        **provenance,
        "splits": dict(splits),
        "total_tokens": sum(info["tokens"] for info in splits.values()),
        **stats,
    }
    _fsync_dir_files(directory)
    atomic_write_text(directory / MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n", durable=True)


def _fsync_dir_files(directory: Path) -> None:
    """Flush shard data to disk before the manifest (and the rename) publish the dataset."""
    for path in directory.iterdir():
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())


# --------------------------------------------------------------------------- reading


def load_manifest(dataset_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The dataset's manifest.json, checked for the keys and format this code reads."""
    path = Path(dataset_dir) / MANIFEST_FILE
    if not path.is_file():
        raise DataError(
            f"{path}: missing; {dataset_dir} is not a prepared dataset (run `orchestra-prepare` "
            "with the same data.* settings first)"
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:  # ValueError: not JSON, or not UTF-8
        raise DataError(f"{path}: not valid JSON ({err}); re-run orchestra-prepare with force=true") from None
    missing = (
        [k for k in _REQUIRED_KEYS if k not in manifest]
        if isinstance(manifest, dict)
        else list(_REQUIRED_KEYS)
    )
    if missing:
        raise DataError(f"{path}: missing keys {missing}; re-run orchestra-prepare with force=true")
    if manifest["format_version"] != FORMAT_VERSION:
        raise DataError(
            f"{path}: format_version {manifest['format_version']!r}, this Orchestra reads {FORMAT_VERSION}; "
            "re-run orchestra-prepare with force=true"
        )
    problem = _manifest_problem(manifest)
    if problem:
        raise DataError(f"{path}: {problem}; re-run orchestra-prepare with force=true")
    return manifest


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _manifest_problem(manifest: dict[str, Any]) -> str | None:
    """What is wrong with the types and counts of a manifest's fields, if anything."""
    try:
        dtype = np.dtype(manifest["dtype"])
    except (TypeError, ValueError):
        return f"dtype {manifest['dtype']!r} is not a numpy dtype"
    if dtype.kind != "u":
        return f"dtype {manifest['dtype']!r} is not an unsigned integer type"
    vocab, eos = manifest["vocab_size"], manifest["eos_id"]
    if not (_is_count(vocab) and _is_count(eos) and eos < vocab <= 2 ** (8 * dtype.itemsize)):
        return f"vocab_size {vocab!r} / eos_id {eos!r} do not fit together or in {dtype}"
    tok = manifest["tokenizer"]
    if not (
        isinstance(tok, dict) and isinstance(tok.get("file"), str) and isinstance(tok.get("sha256"), str)
    ):
        return "tokenizer must record its file and sha256"
    splits = manifest["splits"]
    if not isinstance(splits, dict):
        return f"splits is {type(splits).__name__}, expected an object"
    for split in SPLITS:
        if split not in splits:
            return f"no {split!r} split (has {sorted(splits)})"
        entry = splits[split]
        shards = entry.get("shards") if isinstance(entry, dict) else None
        if not isinstance(shards, list) or not all(
            isinstance(s, dict)
            and isinstance(s.get("file"), str)
            and _is_count(s.get("tokens"))
            and isinstance(s.get("sha256"), str)
            for s in shards
        ):
            return f"split {split!r}: every shard must record its file, tokens and sha256"
        if not _is_count(entry.get("tokens")) or entry["tokens"] != sum(s["tokens"] for s in shards):
            return f"split {split!r}: tokens {entry.get('tokens')!r} is not the sum of its shards' tokens"
    return None


def stored_dtype(manifest: Mapping[str, Any]) -> np.dtype:
    """The dtype the shards were written in (always little-endian, whatever this machine is)."""
    return np.dtype(manifest["dtype"]).newbyteorder("<")


def split_shards(
    dataset_dir: str | os.PathLike[str], manifest: Mapping[str, Any], split: str
) -> list[tuple[Path, int]]:
    """(file, token count) of each shard of ``split``, in stream order."""
    return [(Path(dataset_dir) / s["file"], int(s["tokens"])) for s in manifest["splits"][split]["shards"]]


def _tokenizer_vocab(path: Path) -> int | None:
    """One past the largest id of a tokenizer.json (as vocab_size_of counts), None if it is not one
    whose vocabulary can be read as JSON (the sha256 above already vouches for its bytes)."""
    try:
        data = json.loads(path.read_text())
        ids = [int(i) for i in data["model"]["vocab"].values()]
        ids += [int(t["id"]) for t in data.get("added_tokens") or ()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return max(ids) + 1 if ids else None


def verify_shards(dataset_dir: str | os.PathLike[str], splits: tuple[str, ...] = SPLITS) -> None:
    """Refuse a dataset whose shards (or tokenizer) are missing, truncated or altered."""
    root = Path(dataset_dir)
    manifest = load_manifest(root)
    itemsize = stored_dtype(manifest).itemsize
    tok = manifest["tokenizer"]
    tok_path = root / tok["file"]
    if not tok_path.is_file() or file_sha256(tok_path) != tok["sha256"]:
        raise DataError(
            f"{tok_path}: missing or does not match the sha256 in {MANIFEST_FILE}; re-prepare with force=true"
        )
    recorded = _tokenizer_vocab(tok_path)
    if recorded is not None and recorded != manifest["vocab_size"]:
        raise DataError(
            f"{root / MANIFEST_FILE}: vocab_size {manifest['vocab_size']}, but its tokenizer has {recorded} ids; "
            "re-prepare with force=true"
        )
    for split in splits:
        for shard in manifest["splits"][split]["shards"]:
            path = root / shard["file"]
            if not path.is_file():
                raise DataError(
                    f"{path}: shard listed in {MANIFEST_FILE} is missing; re-prepare with force=true"
                )
            size = path.stat().st_size
            if size != shard["tokens"] * itemsize:
                raise DataError(
                    f"{path}: {size} bytes, expected {shard['tokens'] * itemsize} "
                    f"({shard['tokens']} tokens); the shard is truncated or corrupt, re-prepare with force=true"
                )
            if file_sha256(path) != shard["sha256"]:
                raise DataError(
                    f"{path}: sha256 does not match {MANIFEST_FILE}; the shard is corrupt, re-prepare with force=true"
                )
