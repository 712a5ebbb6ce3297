"""What a checkpoint says about itself: one typed, versioned record, and the one fit check.

Lightning's checkpoint dict carries Orchestra's own entry under :data:`META_KEY`. It is written
in one place (:meth:`CheckpointMeta.to_dict`, called by the LightningModule's
``on_save_checkpoint``) and read everywhere through :meth:`CheckpointMeta.from_dict`, so a
missing field or a format from a newer Orchestra fails here, naming the file, instead of as a
``KeyError`` deep inside export or generation.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from orchestra.config import (
    ConfigError,
    FinetuneConfig,
    FinetuneMethod,
    ModelConfig,
    model_config_from_dict,
    to_plain,
)

META_KEY = "orchestra"
# Format 1: model_config, vocab_size, tokenizer_json, task, and optional eos_id, eos_ids, labels,
# peft, last_row. Bump it when a field changes meaning; readers refuse a format they do not know.
# (eos_ids, chat_template and bos_id came later without a bump: they are optional, and a reader that
# predates them keeps them in `extra`, stops on eos_id, the first eos id, and exports without them.)
FORMAT_VERSION = 1
SHAPE_KEYS = ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "tie_embeddings")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file."""


@dataclass(frozen=True)
class BaseRef:
    """The base model a PEFT checkpoint's tensors belong to: where it was and its fingerprint."""

    path: str
    sha256: str

    def to_dict(self) -> dict[str, str]:
        return {"path": self.path, "sha256": self.sha256}


@dataclass(frozen=True)
class PeftRecord:
    """A PEFT checkpoint holds only the trainable tensors; this rebuilds the rest from the base."""

    method: str
    config: dict[str, Any]
    base: BaseRef

    def finetune_config(self) -> FinetuneConfig:
        kw = dict(self.config)
        kw["method"] = FinetuneMethod(kw["method"])
        return FinetuneConfig(**kw)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "config": dict(self.config), "base": self.base.to_dict()}


@dataclass(frozen=True)
class LastRow:
    """The metrics row Lightning writes just after a save (a kill in between must not lose it)."""

    step: int
    metrics: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "metrics": dict(self.metrics)}


@dataclass(frozen=True)
class CheckpointMeta:
    """Everything generation and export need, so a checkpoint stands on its own."""

    model_config: ModelConfig
    vocab_size: int
    tokenizer_json: str
    task: str = "pretrain"
    # A base's own end token (an HF model's may not be <|endoftext|>); None: the tokenizer's.
    eos_id: int | None = None
    # Every id generation stops on, eos_id first (Llama 3.x Instruct: three); empty: (eos_id,).
    eos_ids: tuple[int, ...] = ()
    # A Hugging Face base's own chat template and BOS id, written back by export; None: none / ours.
    chat_template: str | None = None
    bos_id: int | None = None
    # task=classification: label names in class-index order.
    labels: tuple[str, ...] = ()
    peft: PeftRecord | None = None
    last_row: LastRow | None = None
    format: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """The ids generation stops on: eos_ids, else eos_id (a checkpoint from before eos_ids), else none."""
        if self.eos_ids:
            return self.eos_ids
        return (self.eos_id,) if self.eos_id is not None else ()

    @property
    def is_classifier(self) -> bool:
        """The model ends in a classifier head (its class labels are recorded), not the LM head."""
        return len(self.labels) > 0

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "format": self.format,
            "model_config": to_plain(self.model_config),
            "vocab_size": int(self.vocab_size),
            "tokenizer_json": self.tokenizer_json,
            "task": self.task,
        }
        if self.last_row is not None:
            out["last_row"] = self.last_row.to_dict()
        if self.eos_id is not None:
            out["eos_id"] = int(self.eos_id)
        if self.eos_ids:
            out["eos_ids"] = [int(i) for i in self.eos_ids]
        if self.chat_template is not None:
            out["chat_template"] = self.chat_template
        if self.bos_id is not None:
            out["bos_id"] = int(self.bos_id)
        if self.labels:
            out["labels"] = list(self.labels)
        if self.peft is not None:
            out["peft"] = self.peft.to_dict()
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | CheckpointMeta | None, source: str | Path) -> CheckpointMeta:
        """Parse a checkpoint's entry; any missing or malformed field is one error naming ``source``."""
        if isinstance(d, CheckpointMeta):
            return d
        if not isinstance(d, Mapping) or "model_config" not in d:
            raise CheckpointError(
                f"checkpoint {source} carries no Orchestra metadata (model config, tokenizer): "
                "it was not written by orchestra-train"
            )
        version = d.get("format", 1)
        if version != FORMAT_VERSION:
            raise CheckpointError(
                f"checkpoint {source} has metadata format {version!r}; this Orchestra reads format "
                f"{FORMAT_VERSION} only (upgrade Orchestra to read it)"
            )
        try:
            peft = d.get("peft")
            last_row = d.get("last_row")
            known = {"format", "model_config", "vocab_size", "tokenizer_json", "task", "eos_id", "eos_ids",
                     "chat_template", "bos_id", "labels", "peft", "last_row"}  # fmt: skip
            eos_id = int(d["eos_id"]) if d.get("eos_id") is not None else None
            eos_ids = tuple(int(i) for i in d.get("eos_ids") or ())
            if eos_ids and eos_ids[0] != eos_id:
                raise ValueError(f"eos_ids {list(eos_ids)} must start with eos_id {eos_id}")
            model_config = model_config_from_dict(dict(d["model_config"]))
            _check_shape_fields(model_config)
            model_config.validate("model_config")
            return cls(
                model_config=model_config,
                vocab_size=int(d["vocab_size"]),
                tokenizer_json=str(d.get("tokenizer_json") or ""),
                task=str(d.get("task", "pretrain")),
                eos_id=eos_id,
                eos_ids=eos_ids,
                chat_template=None if d.get("chat_template") is None else str(d["chat_template"]),
                bos_id=None if d.get("bos_id") is None else int(d["bos_id"]),
                labels=tuple(str(x) for x in d.get("labels") or ()),
                peft=None
                if peft is None
                else PeftRecord(
                    method=str(peft["method"]),
                    config=dict(peft["config"]),
                    base=BaseRef(str(peft["base"]["path"]), str(peft["base"]["sha256"])),
                ),
                last_row=None
                if last_row is None
                else LastRow(int(last_row["step"]), {k: float(v) for k, v in last_row["metrics"].items()}),
                format=version,
                extra={k: v for k, v in d.items() if k not in known},
            )
        except (ConfigError, KeyError, TypeError, ValueError, ArithmeticError) as err:
            raise CheckpointError(f"checkpoint {source}: malformed Orchestra metadata ({err!r})") from err

    def check_compatible(
        self,
        source: str | Path,
        model: ModelConfig,
        vocab_size: int,
        peft_method: str | None,
        base: BaseRef | None = None,
    ) -> None:
        """Refuse a checkpoint of another shape, vocabulary, method or base, listing every difference.

        ``peft_method`` is the run's PEFT method (None for full weights); ``base`` the run's base,
        compared by fingerprint when the checkpoint holds only trainable tensors.
        """
        saved, current = to_plain(self.model_config), to_plain(model)
        diffs = [
            f"model.{k}: checkpoint {saved.get(k)!r} vs config {current[k]!r}"
            for k in SHAPE_KEYS
            if saved.get(k) != current[k]
        ]
        if self.vocab_size != vocab_size:
            diffs.append(f"vocab size: checkpoint {self.vocab_size} vs data/config {vocab_size}")
        saved_method = self.peft.method if self.peft else None
        if saved_method != peft_method:
            diffs.append(
                f"finetune.method: checkpoint {saved_method or 'full weights'} vs config {peft_method or 'full weights'}"
            )
        elif self.peft and base is not None and self.peft.base.sha256 != base.sha256:
            # The checkpoint holds only the trainable tensors: on another base they would mean nothing.
            diffs.append(
                f"base model: checkpoint trained on {self.peft.base.path} (sha256 {self.peft.base.sha256[:12]}), "
                f"finetune.init_from is {base.path} (sha256 {base.sha256[:12]})"
            )
        if diffs:
            raise CheckpointError(f"checkpoint {source} does not fit this model: " + "; ".join(diffs))


_SHAPE_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len")


def _check_shape_fields(cfg: ModelConfig) -> None:
    """The integer fields that size tensors are positive integers (a model is built from them)."""
    for name in _SHAPE_FIELDS:
        value = getattr(cfg, name, None)
        if value is None and name == "n_kv_heads":
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"model_config.{name} must be a positive integer, got {value!r}")


def check_tensors(
    state: Mapping[str, torch.Tensor],
    layout: Mapping[str, tuple[int, ...] | torch.Size],
    source: str | Path,
    what: str,
) -> None:
    """The one check that a state dict holds exactly ``layout``'s tensors with its shapes.

    ``what`` names the layout in the message ("the model config recorded in it", "its lora
    layout", ...), so the user learns which side disagrees.
    """
    differing = sorted(set(state) ^ set(layout))
    if differing:
        missing = sorted(set(layout) - set(state))
        unexpected = sorted(set(state) - set(layout))
        raise CheckpointError(
            f"checkpoint {source}: its tensors do not match {what} (differing: {differing[:4]}, {len(differing)} "
            f"in all; missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    for name, shape in layout.items():
        if tuple(state[name].shape) != tuple(shape):
            raise CheckpointError(
                f"checkpoint {source}: tensor {name!r} has shape {tuple(state[name].shape)}, but {what} "
                f"needs {tuple(shape)}"
            )
