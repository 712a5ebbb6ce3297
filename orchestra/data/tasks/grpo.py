"""grpo: prompts with a reference answer, for reinforcement learning on sampled completions.

Records are ``{"prompt": str, "answer": str}``. Each prompt is rendered as SFT renders a user turn
followed by the assistant's header (the chat template's generation prompt), so the policy answers
in the format it was taught. Batches are ``{"tokens": [B, T], "prompt_lengths": [B], "index": [B]}``:
prompts left-padded to the batch's longest (generation continues them all at one position), and
each example's index into its split, where the module finds the answer its reward compares with.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tokenizers import Tokenizer
from torch.utils.data import Dataset

from orchestra.config import TaskConfig
from orchestra.data.tasks.formats import IGNORE_INDEX, read_records, text_field
from orchestra.data.tasks.sft import encode_sft_batch

if TYPE_CHECKING:  # see sft.py
    from orchestra.data.hf_tokenizer import TokenizerSpec

log = logging.getLogger(__name__)

# A stand-in response: the template renders the assistant's turn around it, and the prompt is
# everything before its first token (segments are tokenized apart, so its text changes nothing).
_PLACEHOLDER = "x"


def read_grpo(path: str | os.PathLike[str]) -> list[tuple[str, str]]:
    """(prompt, answer) pairs of a grpo jsonl file."""
    expected = '{"prompt", "answer"}'
    return [
        (text_field(record, "prompt", where, expected), text_field(record, "answer", where, expected))
        for where, record in read_records(path)
    ]


class GRPODataset(Dataset[dict[str, torch.Tensor]]):
    """Rendered prompts (at most ``prompt_len`` tokens: a longer one keeps its end) and their answers."""

    def __init__(
        self, prompts: Sequence[Sequence[int]], answers: Sequence[str], prompt_len: int, where: str
    ) -> None:
        self.answers = list(answers)
        self.prompts = [list(p)[-prompt_len:] for p in prompts]
        cut = sum(len(p) > prompt_len for p in prompts)
        if cut:
            log.warning(
                "%s: %d of %d prompts are longer than %d tokens and lost their start",
                where,
                cut,
                len(prompts),
                prompt_len,
            )

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"prompt": torch.tensor(self.prompts[index], dtype=torch.long), "index": torch.tensor(index)}


def collate_grpo(batch: Sequence[Mapping[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Prompts left-padded to the longest: ``tokens`` [B, T], ``prompt_lengths`` [B], ``index`` [B]."""
    width = max(len(item["prompt"]) for item in batch)
    tokens = torch.full((len(batch), width), pad_id, dtype=torch.long)
    for i, item in enumerate(batch):
        tokens[i, width - len(item["prompt"]) :] = item["prompt"]
    lengths = torch.tensor([len(item["prompt"]) for item in batch])
    return {
        "tokens": tokens,
        "prompt_lengths": lengths,
        "index": torch.stack([item["index"] for item in batch]),
    }


class GRPOTask:
    """grpo for :class:`~orchestra.data.tasks.datamodule.TaskDataModule` (see its ``TaskData``)."""

    def __init__(self, task: TaskConfig, tokens: TokenizerSpec | None = None) -> None:
        self.task, self.tokens = task, tokens
        self.label_names: list[str] = []

    def read(self, train_path: Path, val_path: Path | None) -> tuple[list[Any], list[Any] | None]:
        return read_grpo(train_path), read_grpo(val_path) if val_path is not None else None

    def dataset(
        self, records: list[Any], tokenizer: Tokenizer, eos_id: int, seq_len: int, where: str
    ) -> Dataset[Any]:
        conversations = [
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": _PLACEHOLDER}]
            for prompt, _ in records
        ]
        encoded = encode_sft_batch(conversations, tokenizer, eos_id, self.task.chat_template, self.tokens)
        prompts = [
            ids[: next(i for i, y in enumerate(labels) if y != IGNORE_INDEX)] for ids, labels in encoded
        ]
        # The completion's tokens come after the prompt in the same context.
        prompt_len = max(1, seq_len - self.task.max_new_tokens)
        return GRPODataset(prompts, [answer for _, answer in records], prompt_len, where)

    def collate_fn(self, pad_id: int) -> Callable[[Any], dict[str, torch.Tensor]]:
        return functools.partial(collate_grpo, pad_id=pad_id)
