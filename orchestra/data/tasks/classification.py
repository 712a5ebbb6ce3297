"""classification: texts with a class label, read by the model at their last token.

Records are ``{"text": str, "label": str}``. Batches are ``{"tokens": [B, T], "last_index": [B],
"labels": [B]}``, right-padded to the longest text of the batch; ``last_index`` is the position
of each row's last real token.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tokenizers import Tokenizer
from torch.utils.data import Dataset

from orchestra.config import TaskConfig
from orchestra.data.errors import DataError
from orchestra.data.tasks.formats import read_records, text_field

if TYPE_CHECKING:  # see sft.py
    from orchestra.data.hf_tokenizer import TokenizerSpec

log = logging.getLogger(__name__)

_FORM = '{"text", "label"}'


def read_classification(
    path: str | os.PathLike[str], labels: Sequence[str] | None = None
) -> tuple[list[str], list[str]]:
    """(texts, labels) of a classification jsonl file; with ``labels`` given, any other label is refused."""
    known = set(labels) if labels is not None else None
    texts, found = [], []
    for where, record in read_records(path):
        texts.append(text_field(record, "text", where, _FORM))
        label = text_field(record, "label", where, _FORM)
        if known is not None and label not in known:
            raise DataError(
                f"{where}: unknown label {label!r} (known labels: {list(labels or [])}; set task.labels "
                "to list every class)"
            )
        found.append(label)
    return texts, found


def encode_texts(texts: Sequence[str], tokenizer: Tokenizer) -> list[list[int]]:
    """Plain token ids of texts (no special tokens added)."""
    return [enc.ids for enc in tokenizer.encode_batch(list(texts), add_special_tokens=False)] if texts else []


class ClassificationDataset(Dataset[dict[str, Any]]):
    """Texts as token ids (their first seq_len tokens) and class indices; padding is the collate's job."""

    def __init__(
        self,
        texts_ids: Sequence[Sequence[int]],
        label_ids: Sequence[int],
        seq_len: int,
        pad_id: int,
        where: str = "classification",
    ) -> None:
        if len(texts_ids) != len(label_ids):
            raise ValueError(f"{len(texts_ids)} texts but {len(label_ids)} labels")
        self.pad_id = pad_id
        self.texts = [np.asarray(ids[:seq_len], dtype=np.int32) for ids in texts_ids]
        self.labels = [int(y) for y in label_ids]
        if any(len(t) == 0 for t in self.texts):
            raise DataError(f"{where}: a text tokenizes to no tokens")
        self.truncated = sum(len(ids) > seq_len for ids in texts_ids)
        if self.truncated:
            log.warning(
                "%s: %d of %d texts are longer than seq_len=%d tokens; only their first %d tokens are read",
                where,
                self.truncated,
                len(texts_ids),
                seq_len,
                seq_len,
            )

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"tokens": torch.from_numpy(self.texts[index].astype(np.int64)), "label": self.labels[index]}


def collate_classification(batch: Sequence[Mapping[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the batch's longest text; ``last_index`` points at each row's last real token."""
    lengths = [len(item["tokens"]) for item in batch]
    tokens = torch.full((len(batch), max(lengths)), pad_id, dtype=torch.long)
    for i, item in enumerate(batch):
        tokens[i, : lengths[i]] = item["tokens"]
    return {
        "tokens": tokens,
        "last_index": torch.tensor(lengths, dtype=torch.long) - 1,
        "labels": torch.tensor([int(item["label"]) for item in batch], dtype=torch.long),
    }


def class_counts(records: Sequence[tuple[str, str]], label_names: Sequence[str]) -> list[int]:
    """Examples per class of (text, label) records, in ``label_names`` order."""
    index = {name: i for i, name in enumerate(label_names)}
    counts = [0] * len(label_names)
    for _, label in records:
        counts[index[label]] += 1
    return counts


class ClassificationTask:
    """classification for :class:`~orchestra.data.tasks.datamodule.TaskDataModule` (see its ``TaskData``).

    The classes are task.labels in that order, else the sorted labels of the train file; a val
    file may only use those.
    """

    def __init__(self, task: TaskConfig, tokens: TokenizerSpec | None = None) -> None:
        # ``tokens`` (a base's chat template, BOS) is unused: texts are classified as they are.
        self.configured = list(task.labels) or None
        self.label_names: list[str] = []  # known once read() has seen the train file

    def read(self, train_path: Path, val_path: Path | None) -> tuple[list[Any], list[Any] | None]:
        texts, labels = read_classification(train_path, self.configured)
        self.label_names = self.configured or sorted(set(labels))
        train: list[Any] = list(zip(texts, labels, strict=True))
        if val_path is None:
            return train, None
        return train, list(zip(*read_classification(val_path, self.label_names), strict=True))

    def dataset(
        self, records: list[Any], tokenizer: Tokenizer, eos_id: int, seq_len: int, where: str
    ) -> Dataset[Any]:
        index = {name: i for i, name in enumerate(self.label_names)}
        texts = encode_texts([text for text, _ in records], tokenizer)
        return ClassificationDataset(
            texts, [index[label] for _, label in records], seq_len, eos_id, where=where
        )

    def collate_fn(self, pad_id: int) -> Callable[[Any], dict[str, torch.Tensor]]:
        return functools.partial(collate_classification, pad_id=pad_id)
