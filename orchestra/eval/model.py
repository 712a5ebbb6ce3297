"""The model under evaluation: weights, tokenizer and the tokens that frame a sequence.

Built by :func:`orchestra.train.checkpoint.load.load_for_eval` from a training checkpoint (PEFT
ones included), or by :func:`from_hf_folder` from an exported / Hugging Face folder, so every
task sees one interface whatever the artifact was.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from orchestra.data.hf_tokenizer import read_tokenizer_spec


@dataclass
class EvalModel:
    """A model ready to score and generate, with what its tokenizer needs to frame text."""

    model: nn.Module
    tokenizer: Any  # tokenizers.Tokenizer
    # Every id generation stops on (the primary first); the prefix of an empty context when no BOS.
    eos_ids: tuple[int, ...]
    bos_id: int | None = None
    # The tokenizer's own encode starts a sequence with BOS (Llama, Gemma); scoring keeps that.
    add_bos: bool = False
    chat_template: str | None = None
    # What was loaded, for results files and tables: "checkpoint", "peft checkpoint", "hf folder".
    kind: str = "checkpoint"
    source: str = ""
    # The sha256 of the tokenizer.json this model reads, to refuse data tokenized by another.
    tokenizer_sha256: str = ""
    # A classifier checkpoint (task=classification): label names in class-index order.
    labels: tuple[str, ...] = ()

    @property
    def prefix_id(self) -> int:
        """The token a document is conditioned on: BOS, else the primary EOS (as lm-eval does)."""
        return self.bos_id if self.bos_id is not None else self.eos_ids[0]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Ids of ``text``, by default as the tokenizer frames a sequence (its BOS where it adds one)."""
        ids: list[int] = self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        return ids

    def decode(self, ids: list[int]) -> str:
        text: str = self.tokenizer.decode(ids)
        return text


def tokenizer_sha256(tokenizer_json: str) -> str:
    import hashlib

    return hashlib.sha256(tokenizer_json.encode()).hexdigest()


def from_hf_folder(folder: str | Path, dtype: torch.dtype = torch.float32) -> EvalModel:
    """An exported or Hugging Face folder (config.json, safetensors, tokenizer.json) as an EvalModel."""
    import json

    from orchestra.model.hf import load_hf_pretrained

    path = Path(folder)
    model, tokenizer = load_hf_pretrained(path, dtype=dtype)
    if tokenizer is None:
        raise FileNotFoundError(f"{path} has no tokenizer.json: evaluation needs the model's tokenizer")
    spec = read_tokenizer_spec(path, tokenizer, json.loads((path / "config.json").read_text()))
    return EvalModel(
        model=model,
        tokenizer=tokenizer,
        eos_ids=spec.eos_ids,
        bos_id=spec.bos_id,
        add_bos=spec.add_bos,
        chat_template=spec.chat_template,
        kind="hf folder",
        source=str(path),
        tokenizer_sha256=tokenizer_sha256((path / "tokenizer.json").read_text()),
    )
