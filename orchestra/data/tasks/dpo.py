"""Preference pairs: a prompt with a chosen and a rejected response, rendered through the sft chat template.

Records are ``{"prompt": str, "chosen": str, "rejected": str}``; dpo, orpo, simpo, kto and reward
all read them. Batches are ``{"tokens": [2B, T], "labels": [2B, T]}``: the B chosen rows, then the
B rejected rows, padded to one common length so both halves go through the model in one forward.

* kto adds B rows after those: each prompt with another example's chosen response (the mismatched
  pairs whose log-ratio estimates KTO's reference point, as Ethayarajh et al. 2024 do).
* reward adds ``last_index`` [2B]: each row's last position that is not padding, the token whose
  hidden state the reward head scores (Hugging Face's sequence classifiers pick the same one).
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

from orchestra.config import ConfigError, TaskConfig
from orchestra.data.tasks.formats import IGNORE_INDEX, read_records, text_field
from orchestra.data.tasks.sft import encode_sft_batch

if TYPE_CHECKING:  # see sft.py
    from orchestra.data.hf_tokenizer import TokenizerSpec

log = logging.getLogger(__name__)


def read_dpo(path: str | os.PathLike[str]) -> list[tuple[str, str, str]]:
    """(prompt, chosen, rejected) triples of a dpo jsonl file."""
    expected = '{"prompt", "chosen", "rejected"}'
    triples = []
    for where, record in read_records(path):
        prompt, chosen, rejected = (
            text_field(record, key, where, expected) for key in ("prompt", "chosen", "rejected")
        )
        triples.append((prompt, chosen, rejected))
    return triples


def dpo_side(
    prompt: Sequence[int], response: Sequence[int], eos_id: int, seq_len: int
) -> tuple[list[int], list[int]]:
    """(inputs, targets) of prompt + response + EOS, shifted as in SFT, the prompt masked.

    At most seq_len positions: the prompt is kept whole and the response's end is cut; a prompt
    of seq_len tokens or more loses its start instead, so one response token always remains.
    """
    prompt = list(prompt)[-seq_len:]
    answer = [*response, eos_id][: seq_len + 1 - len(prompt)]
    ids = prompt + answer
    labels = [IGNORE_INDEX] * len(prompt) + answer
    return ids[:-1], labels[1:]


def dpo_row(ids: Sequence[int], labels: Sequence[int], seq_len: int) -> tuple[list[int], list[int]]:
    """(inputs, targets) of one rendered side (ids + labels, prompt masked), cut as :func:`dpo_side` cuts."""
    ids, labels = list(ids), list(labels)
    n_prompt = next((i for i, y in enumerate(labels) if y != IGNORE_INDEX), len(labels))
    if n_prompt >= seq_len:  # keep at least one response token: drop the prompt's start
        cut = n_prompt - seq_len + 1
        ids, labels = ids[cut:], labels[cut:]
    ids, labels = ids[: seq_len + 1], labels[: seq_len + 1]
    return ids[:-1], labels[1:]


class DPODataset(Dataset[dict[str, torch.Tensor]]):
    """(prompt, chosen, rejected) as two unpadded (tokens, labels) sequences sharing the prompt."""

    def __init__(
        self,
        examples_ids: Sequence[tuple[Sequence[int], Sequence[int], Sequence[int]]],
        seq_len: int,
        eos_id: int,
        where: str = "dpo",
    ) -> None:
        if seq_len <= 0:
            raise ConfigError(f"seq_len: must be positive, got {seq_len}")
        self.pairs: list[tuple[np.ndarray, ...]] = []
        self.truncated = 0
        for prompt, chosen, rejected in examples_ids:
            longest = len(prompt) + max(len(chosen), len(rejected)) + 1
            self.truncated += longest > seq_len + 1
            sides = (dpo_side(prompt, chosen, eos_id, seq_len), dpo_side(prompt, rejected, eos_id, seq_len))
            self.pairs.append(tuple(np.asarray(x, dtype=np.int32) for side in sides for x in side))
        if self.truncated:
            log.warning(
                "%s: %d of %d examples are longer than seq_len=%d and were cut (the response's end, or "
                "the prompt's start for a very long prompt)",
                where,
                self.truncated,
                len(self.pairs),
                seq_len,
            )

    @classmethod
    def from_rendered(
        cls,
        sides: Sequence[tuple[tuple[list[int], list[int]], tuple[list[int], list[int]]]],
        seq_len: int,
        where: str = "dpo",
    ) -> DPODataset:
        """Pairs already rendered through the chat template (as SFT renders them): ((ids, labels) x 2)."""
        self = cls([], seq_len, 0, where=where)
        for chosen, rejected in sides:
            self.truncated += max(len(chosen[0]), len(rejected[0])) > seq_len + 1
            rows = (dpo_row(*chosen, seq_len), dpo_row(*rejected, seq_len))
            self.pairs.append(tuple(np.asarray(x, dtype=np.int32) for side in rows for x in side))
        if self.truncated:
            log.warning(
                "%s: %d of %d examples are longer than seq_len=%d and were cut",
                where,
                self.truncated,
                len(self.pairs),
                seq_len,
            )
        return self

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        keys = ("chosen_tokens", "chosen_labels", "rejected_tokens", "rejected_labels")
        return {k: torch.from_numpy(v.astype(np.int64)) for k, v in zip(keys, self.pairs[index], strict=True)}


def collate_dpo(batch: Sequence[Mapping[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen rows then rejected rows, right-padded to one common length: ``[2B, T]``."""
    rows = [(item["chosen_tokens"], item["chosen_labels"]) for item in batch]
    rows += [(item["rejected_tokens"], item["rejected_labels"]) for item in batch]
    return _pad_rows(rows, pad_id)


def split_side(tokens: np.ndarray, labels: np.ndarray) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) of one shifted (inputs, targets) side, the response with its EOS."""
    full = [*tokens.tolist(), int(labels[-1])]
    masked = int(np.argmax(labels != IGNORE_INDEX)) if (labels != IGNORE_INDEX).any() else len(labels)
    return full[: masked + 1], full[masked + 1 :]


class KTODataset(Dataset[dict[str, torch.Tensor]]):
    """Preference pairs plus, per pair, a mismatched row: its prompt with the next example's chosen response.

    The mismatched partner is fixed by dataset order ((i + 1) mod N, as TRL's KTO shifts
    completions by one), so every rank and every resume sees the same rows.
    """

    def __init__(self, pairs: DPODataset, seq_len: int) -> None:
        self.pairs = pairs
        self.seq_len = seq_len
        self.truncated = pairs.truncated

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = self.pairs[index]
        prompt, _ = split_side(item["chosen_tokens"].numpy(), item["chosen_labels"].numpy())
        other = self.pairs[(index + 1) % len(self.pairs)]
        _, response = split_side(other["chosen_tokens"].numpy(), other["chosen_labels"].numpy())
        tokens, labels = dpo_row(prompt + response, [IGNORE_INDEX] * len(prompt) + response, self.seq_len)
        return {**item, "kl_tokens": torch.tensor(tokens), "kl_labels": torch.tensor(labels)}


def _pad_rows(rows: Sequence[tuple[torch.Tensor, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(tokens) for tokens, _ in rows)
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, (t, y) in enumerate(rows):
        tokens[i, : len(t)], labels[i, : len(y)] = t, y
    return {"tokens": tokens, "labels": labels}


def collate_kto(batch: Sequence[Mapping[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen rows, rejected rows, then the mismatched rows, right-padded to one length: ``[3B, T]``."""
    rows = [(item["chosen_tokens"], item["chosen_labels"]) for item in batch]
    rows += [(item["rejected_tokens"], item["rejected_labels"]) for item in batch]
    rows += [(item["kl_tokens"], item["kl_labels"]) for item in batch]
    return _pad_rows(rows, pad_id)


def last_real_index(tokens: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Each row's last position whose token is not ``pad_id`` [B] (0 for an all-padding row).

    Hugging Face's ``<Family>ForSequenceClassification`` pools the same token (the rightmost
    non-pad one), so an exported reward model scores a row as training did.
    """
    positions = torch.arange(tokens.shape[1], device=tokens.device)
    return (positions * (tokens != pad_id)).argmax(-1)


def collate_reward(batch: Sequence[Mapping[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """:func:`collate_dpo` plus ``last_index`` [2B], the position the reward head reads."""
    out = collate_dpo(batch, pad_id)
    out["last_index"] = last_real_index(out["tokens"], pad_id)
    return out


class DPOTask:
    """dpo, orpo and simpo for :class:`~orchestra.data.tasks.datamodule.TaskDataModule` (see its ``TaskData``)."""

    def __init__(self, task: TaskConfig, tokens: TokenizerSpec | None = None) -> None:
        self.task, self.tokens = task, tokens
        self.label_names: list[str] = []

    def read(self, train_path: Path, val_path: Path | None) -> tuple[list[Any], list[Any] | None]:
        return read_dpo(train_path), read_dpo(val_path) if val_path is not None else None

    def dataset(
        self, records: list[Any], tokenizer: Tokenizer, eos_id: int, seq_len: int, where: str
    ) -> Dataset[Any]:
        # Rendered as SFT renders a prompt/response pair (same chat template), so preference tuning
        # sees the format supervised fine-tuning taught.
        conversations = [
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
            for prompt, chosen, rejected in records
            for answer in (chosen, rejected)
        ]
        encoded = encode_sft_batch(conversations, tokenizer, eos_id, self.task.chat_template, self.tokens)
        pairs = [(encoded[i], encoded[i + 1]) for i in range(0, len(encoded), 2)]
        return DPODataset.from_rendered(pairs, seq_len, where=where)

    def collate_fn(self, pad_id: int) -> Callable[[Any], dict[str, torch.Tensor]]:
        return functools.partial(collate_dpo, pad_id=pad_id)


class KTOTask(DPOTask):
    """kto: the pairs' chosen responses as desirable, rejected as undesirable, plus mismatched rows."""

    def dataset(
        self, records: list[Any], tokenizer: Tokenizer, eos_id: int, seq_len: int, where: str
    ) -> Dataset[Any]:
        pairs = super().dataset(records, tokenizer, eos_id, seq_len, where)
        assert isinstance(pairs, DPODataset)
        return KTODataset(pairs, seq_len)

    def collate_fn(self, pad_id: int) -> Callable[[Any], dict[str, torch.Tensor]]:
        return functools.partial(collate_kto, pad_id=pad_id)


class RewardTask(DPOTask):
    """reward: the pairs, with the position each row's score is read at."""

    def collate_fn(self, pad_id: int) -> Callable[[Any], dict[str, torch.Tensor]]:
        return functools.partial(collate_reward, pad_id=pad_id)
