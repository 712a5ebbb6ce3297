"""sft: conversations, tokenized with the response masked in, packed into fixed-length rows.

Records are ``{"prompt": str, "response": str}`` or ``{"messages": [{"role", "content"}, ...]}``
ending with an assistant message. Batches are ``{"tokens", "labels", "segment_ids"}``, each
``[B, seq_len]`` int64: ``labels[t]`` is the target of position t (already shifted), and
``segment_ids`` is 1, 2, 3... per example of a packed row and 0 on its padding, for the
attention mask.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tokenizers import Tokenizer
from torch.utils.data import Dataset, default_collate

from orchestra.config import ConfigError, TaskConfig
from orchestra.data.errors import DataError
from orchestra.data.tasks.chat import Messages, as_messages, conversation, render_chat
from orchestra.data.tasks.formats import IGNORE_INDEX, read_records
from orchestra.data.tokenizer import EOS_TOKEN

if TYPE_CHECKING:  # a runtime import would run orchestra.data.tasks from inside hf_tokenizer's import
    from orchestra.data.hf_tokenizer import TokenizerSpec

log = logging.getLogger(__name__)


def read_sft(path: str | os.PathLike[str]) -> list[Messages]:
    """The conversations of an sft jsonl file (prompt/response pairs turned into two messages)."""
    return [conversation(record, where) for where, record in read_records(path)]


def _encode_texts(
    tokenizer: Tokenizer, texts: list[str], eos_id: int, eos_token: str | None
) -> list[list[int]]:
    """Token ids of each text; the EOS token's own text is always exactly [eos_id]."""
    encoded = tokenizer.encode_batch(texts, add_special_tokens=False) if texts else []
    return [[eos_id] if text == eos_token else enc.ids for text, enc in zip(texts, encoded, strict=True)]


def encode_sft_batch(
    examples: Sequence[Mapping[str, Any] | Sequence[Mapping[str, str]]],
    tokenizer: Tokenizer,
    eos_id: int,
    template: str | None = None,
    tokens: TokenizerSpec | None = None,
) -> list[tuple[list[int], list[int]]]:
    """:func:`encode_sft` of many examples, with one batched tokenizer call."""
    eos_token = tokenizer.id_to_token(eos_id)
    where = "task.chat_template"
    if template is None and tokens is not None and tokens.chat_template is not None:
        template, where = tokens.chat_template, tokens.chat_template_source or "the base's chat_template"
    if template is None:  # Orchestra's plain template: each turn closed by the primary EOS
        render_eos, bos_token = eos_token or EOS_TOKEN, ""
    else:  # the variables transformers' apply_chat_template gives a template
        render_eos = (tokens.eos_token if tokens is not None else None) or eos_token or EOS_TOKEN
        bos_token = (tokens.bos_token if tokens is not None else None) or ""
    stop = set(tokens.eos_ids if tokens is not None and tokens.eos_ids else ()) | {eos_id}
    bos_id = tokens.bos_id if tokens is not None and tokens.add_bos else None
    bos_text = tokenizer.id_to_token(bos_id) if bos_id is not None else None
    rendered = [
        render_chat(as_messages(ex), template, render_eos, bos_token=bos_token, where=where)
        for ex in examples
    ]
    pieces = _encode_texts(tokenizer, [text for segs in rendered for text, _ in segs], eos_id, eos_token)
    out, k = [], 0
    for segs in rendered:
        ids: list[int] = []
        labels: list[int] = []
        if bos_id is not None and not (bos_text and segs and segs[0][0].startswith(bos_text)):
            # The base's tokenizer starts a sequence with BOS, and the template did not write it.
            ids, labels = [bos_id], [IGNORE_INDEX]
        last_trained = 0  # one past the last trained token
        last_piece: list[int] = []
        for _, trained in segs:
            piece = pieces[k]
            k += 1
            ids += piece
            labels += piece if trained else [IGNORE_INDEX] * len(piece)
            if trained and piece:
                last_trained, last_piece = len(ids), piece
        if last_trained == 0:
            raise DataError(f"an sft example renders to no trained (assistant) tokens; check {where}")
        if stop.isdisjoint(last_piece):
            # A custom template ends turns with its own marker; the model must still learn to stop.
            ids.insert(last_trained, eos_id)
            labels.insert(last_trained, eos_id)
        out.append((ids, labels))
    return out


def encode_sft(
    example: Mapping[str, Any] | Sequence[Mapping[str, str]],
    tokenizer: Tokenizer,
    eos_id: int,
    template: str | None = None,
    tokens: TokenizerSpec | None = None,
) -> tuple[list[int], list[int]]:
    """(token ids, labels) of one sft example, labels ``-100`` wherever the text is not trained.

    Tokenized segment by segment (see :func:`render_chat`), so the mask boundary falls exactly
    between tokens of the prompt and of the response. The last response always ends with a trained
    EOS: one of ``tokens.eos_ids`` the template writes (``<|eot_id|>``, ``<|im_end|>``), else
    ``eos_id`` appended.

    ``template`` (task.chat_template) wins; else a Hugging Face base's own template
    (``tokens.chat_template``, rendered with its ``bos_token`` and ``eos_token`` as
    ``apply_chat_template`` renders it); else Orchestra's plain one. With ``tokens.add_bos`` the
    sequence starts with ``tokens.bos_id``, unless the render already starts with the BOS text
    (Llama 3 and Gemma templates write it themselves).
    """
    return encode_sft_batch([example], tokenizer, eos_id, template, tokens)[0]


class SFTDataset(Dataset[dict[str, torch.Tensor]]):
    """Rows of exactly seq_len positions, one example each or several packed.

    Each example is shifted on its own (inputs ``ids[:-1]``, targets ``labels[1:]``), so no
    target ever crosses from one example into the next. ``pack=True`` fills rows greedily with
    whole examples in file order; the tail of a row is padding (``pad_id``, target -100, segment
    0). An example longer than seq_len keeps its start; one left with no trained target is dropped.
    """

    def __init__(
        self,
        examples_ids: Sequence[tuple[Sequence[int], Sequence[int]]],
        seq_len: int,
        pack: bool,
        pad_id: int,
        where: str = "sft",
    ) -> None:
        if seq_len <= 0:
            raise ConfigError(f"seq_len: must be positive, got {seq_len}")
        self.seq_len, self.pack = seq_len, pack
        examples: list[tuple[np.ndarray, np.ndarray]] = []
        self.truncated = self.dropped = 0
        for ids, labels in examples_ids:
            inputs = np.asarray(ids[:-1], dtype=np.int32)
            targets = np.asarray(labels[1:], dtype=np.int32)
            if len(inputs) > seq_len:
                self.truncated += 1
                inputs, targets = inputs[:seq_len], targets[:seq_len]
            if not (targets != IGNORE_INDEX).any():
                self.dropped += 1
                continue
            examples.append((inputs, targets))
        if self.truncated or self.dropped:
            log.warning(
                "%s: %d of %d examples are longer than seq_len=%d and were cut (their ends dropped); "
                "%d example(s) left with no trained token were left out",
                where,
                self.truncated,
                len(examples_ids),
                seq_len,
                self.dropped,
            )
        if not examples:
            raise DataError(f"{where}: no example has a trained token within seq_len={seq_len}")
        rows: list[list[tuple[np.ndarray, np.ndarray]]] = []
        used = seq_len + 1  # forces a new row for the first example
        for example in examples:
            if not pack or used + len(example[0]) > seq_len:
                rows.append([])
                used = 0
            rows[-1].append(example)
            used += len(example[0])
        self.examples = len(examples)
        self.tokens = np.full((len(rows), seq_len), pad_id, dtype=np.int32)
        self.labels = np.full((len(rows), seq_len), IGNORE_INDEX, dtype=np.int32)
        self.segment_ids = np.zeros((len(rows), seq_len), dtype=np.int32)
        for r, row in enumerate(rows):
            pos = 0
            for s, (inputs, targets) in enumerate(row, start=1):
                end = pos + len(inputs)
                self.tokens[r, pos:end], self.labels[r, pos:end], self.segment_ids[r, pos:end] = (
                    inputs,
                    targets,
                    s,
                )
                pos = end

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {
            "tokens": torch.from_numpy(self.tokens[index].astype(np.int64)),
            "labels": torch.from_numpy(self.labels[index].astype(np.int64)),
            "segment_ids": torch.from_numpy(self.segment_ids[index].astype(np.int64)),
        }


class SFTTask:
    """sft for :class:`~orchestra.data.tasks.datamodule.TaskDataModule` (see its ``TaskData``)."""

    def __init__(self, task: TaskConfig, tokens: TokenizerSpec | None = None) -> None:
        self.task, self.tokens = task, tokens
        self.label_names: list[str] = []

    def read(self, train_path: Path, val_path: Path | None) -> tuple[list[Any], list[Any] | None]:
        return read_sft(train_path), read_sft(val_path) if val_path is not None else None

    def dataset(
        self, records: list[Any], tokenizer: Tokenizer, eos_id: int, seq_len: int, where: str
    ) -> Dataset[Any]:
        encoded = encode_sft_batch(records, tokenizer, eos_id, self.task.chat_template, self.tokens)
        return SFTDataset(encoded, seq_len, self.task.pack, eos_id, where=where)

    def collate_fn(self, pad_id: int) -> Callable[[Any], dict[str, torch.Tensor]]:
        return default_collate  # rows are already padded to seq_len
