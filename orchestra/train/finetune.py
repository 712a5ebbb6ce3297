"""Fine-tuning: load a base model (ours or Hugging Face), then choose what trains.

The base fixes the model shape and the tokenizer, so train() takes both from here instead of
from model.* and the data's own tokenizer. The PEFT methods themselves live in
orchestra/model/peft.py; this module only maps the config onto them and records, in PEFT
checkpoints, which base they belong to (path + a cheap fingerprint, see :func:`base_fingerprint`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from torch import nn

from orchestra.config import ConfigError, FinetuneConfig, FinetuneMethod, ModelConfig, to_plain
from orchestra.data.hf_tokenizer import TokenizerSpec, read_tokenizer_spec
from orchestra.model.heads import SequenceClassifier
from orchestra.train.checkpoint.io import consolidated_state_dict, read_meta
from orchestra.train.checkpoint.meta import (
    BaseRef,
    CheckpointError,
    CheckpointMeta,
    PeftRecord,
    check_tensors,
)
from orchestra.train.methods import method_spec

_CHUNK = 1 << 20


@dataclass(frozen=True)
class BaseModel:
    """What a fine-tuning run takes from its base: shape, vocabulary, tokenizer, identity -- and,
    on demand, its weights.

    The weights are read from disk each time :attr:`state_dict` is asked for, never kept here: a
    run plan holds this record for the whole run, and an 8B base would otherwise stay in memory
    beside the model it was loaded into.
    """

    model_config: ModelConfig
    vocab_size: int
    tokenizer_json: str
    reference: BaseRef
    # Chat template, BOS and every EOS id (an HF folder's tokenizer files; a checkpoint's one EOS).
    tokens: TokenizerSpec = field(default_factory=TokenizerSpec)

    @property
    def eos_id(self) -> int:
        """The token that ends a document / response (fine-tuning data ends its turns with it)."""
        return self.tokens.eos_ids[0] if self.tokens.eos_ids else 0

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """Every id generation stops on, :attr:`eos_id` first."""
        return self.tokens.eos_ids or (self.eos_id,)

    @property
    def bos_id(self) -> int | None:
        return self.tokens.bos_id

    @property
    def chat_template(self) -> str | None:
        """The base's own chat template (SFT and DPO render with it unless task.chat_template is set)."""
        return self.tokens.chat_template

    @property
    def add_bos(self) -> bool:
        """The base's tokenizer starts every sequence with BOS (unless its template already does)."""
        return self.tokens.add_bos

    @property
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The full fp32 weights under our parameter names (read now, from the base's files)."""
        return load_base_weights(self.reference.path, self.model_config)


def _parse_tokenizer(tokenizer_json: str, source: Path) -> Tokenizer:
    try:
        return Tokenizer.from_str(tokenizer_json)
    except Exception as err:  # tokenizers raises a bare Exception for a malformed tokenizer.json
        raise CheckpointError(f"base {source}: its tokenizer is not a valid tokenizer.json ({err})") from None


def _checkpoint_eos_id(tokenizer_json: str, source: Path) -> int:
    """An Orchestra checkpoint's end-of-sequence id: a known end-of-text token of its tokenizer."""
    tokenizer = _parse_tokenizer(tokenizer_json, source)
    for token in ("<|endoftext|>", "</s>", "<|end_of_text|>", "<|im_end|>"):
        found = tokenizer.token_to_id(token)
        if found is not None:
            return int(found)
    raise ConfigError(
        f"finetune.init_from: {source} names no eos_token_id and its tokenizer has no known "
        "end-of-text token; add eos_token_id to config.json"
    )


def _hf_tokens(path: Path, tokenizer_json: str, hf_config: dict[str, Any], vocab: int) -> TokenizerSpec:
    """An HF folder's tokenizer files as a TokenizerSpec; every EOS id one the model can emit."""
    try:
        tokenizer = Tokenizer.from_str(tokenizer_json)
    except Exception as err:  # tokenizers raises a bare Exception for a malformed tokenizer.json
        raise ConfigError(
            f"finetune.init_from: {path / 'tokenizer.json'} is not a valid tokenizer.json ({err})"
        ) from None
    try:
        tokens = read_tokenizer_spec(path, tokenizer, hf_config)
    except ConfigError as err:
        raise ConfigError(f"finetune.init_from: {err}") from None
    outside = [i for i in (*tokens.eos_ids, tokens.bos_id) if i is not None and i >= vocab]
    if outside:
        raise ConfigError(
            f"finetune.init_from: {path}: token id(s) {outside} (EOS/BOS of its tokenizer files) are outside "
            f"the model's vocabulary of {vocab} (config.json vocab_size)"
        )
    return tokens


def _sha256_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for path in paths:
        h.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    return h.hexdigest()


def base_fingerprint(path: str | Path) -> str:
    """sha256 identifying a base model, cheap enough to compute at every start.

    A checkpoint file is hashed whole. A directory is hashed by its small descriptive files
    only: an HF folder by config.json plus model.safetensors.index.json (or, for a single
    model.safetensors, its header, which lists every tensor's name, dtype, shape and offsets);
    a sharded/DeepSpeed checkpoint by its metadata files. A directory's fingerprint therefore
    tells bases of different shape or layout apart, not two trainings of the same shape.
    """
    path = Path(path)
    if path.is_file():  # plain sha256 of the file, as `sha256sum` prints it
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        return h.hexdigest()
    names = ["config.json", "model.safetensors.index.json", ".metadata", "meta.pt", "latest"]
    files = [path / n for n in names if (path / n).is_file()]
    h = hashlib.sha256(_sha256_files(files).encode())
    single = path / "model.safetensors"
    if single.is_file():
        with open(single, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            h.update(f.read(header_len))
    return h.hexdigest()


def _is_hf_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def load_base(init_from: str | Path) -> BaseModel:
    """Read a base model's config, tokenizer (with its template, BOS and EOS ids) and fingerprint.

    Not its weights; everything is checked here, before a run writes anything.
    """
    from orchestra.model.hf import HFImportError, model_config_from_hf
    from orchestra.model.hub import HubError, is_hub_id, resolve_model_path

    path = Path(init_from)
    if not path.exists() and is_hub_id(str(init_from)):
        # A Hub id (org/name[@revision]): its snapshot in huggingface_hub's cache is the base.
        try:
            path = resolve_model_path(init_from, "finetune.init_from")
        except HubError as err:
            raise ConfigError(str(err)) from err
    if not path.exists():
        raise ConfigError(
            f"finetune.init_from: {str(path)!r} does not exist; expected an Orchestra checkpoint "
            "(checkpoints/last.ckpt or a sharded checkpoint dir) or a Hugging Face folder with config.json"
        )
    reference = BaseRef(str(path.resolve()), base_fingerprint(path))
    if _is_hf_folder(path):
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise ConfigError(
                f"finetune.init_from: {path} has no tokenizer.json; fine-tuning tokenizes the data with the "
                "base's own tokenizer (save it once with AutoTokenizer.from_pretrained(folder)"
                ".save_pretrained(folder))"
            )
        try:
            hf_config = json.loads((path / "config.json").read_text())
            cfg, vocab = model_config_from_hf(hf_config)
        except (HFImportError, json.JSONDecodeError) as err:
            raise ConfigError(f"finetune.init_from: {path}: {err}") from err
        tokenizer_json = tokenizer_file.read_text()
        tokens = _hf_tokens(path, tokenizer_json, hf_config, vocab)
        # Refuse a folder whose weights do not load now, before anything is written.
        _check_hf_weights(path, cfg)
        return BaseModel(cfg, vocab, tokenizer_json, reference, tokens)
    try:
        meta = read_meta(path)
    except CheckpointError as err:
        raise ConfigError(f"finetune.init_from: {err}") from err
    if meta.is_classifier:
        raise ConfigError(
            f"finetune.init_from: {path} is a sequence classifier (task=classification); start from the "
            "language model it was fine-tuned from, or export it (orchestra-export) for transformers"
        )
    if meta.peft is not None:
        raise ConfigError(
            f"finetune.init_from: {path} is a {meta.peft.method} checkpoint holding only its trainable "
            "weights; export it (orchestra-export) and start from the merged Hugging Face folder"
        )
    if not meta.tokenizer_json:
        raise ConfigError(f"finetune.init_from: checkpoint {path} records no tokenizer")
    vocab = meta.vocab_size
    return BaseModel(
        replace(meta.model_config, vocab_size=vocab),
        vocab,
        meta.tokenizer_json,
        reference,
        TokenizerSpec(eos_ids=(_checkpoint_eos_id(meta.tokenizer_json, path),)),
    )


def _check_hf_weights(path: Path, cfg: ModelConfig) -> None:
    """The safetensors files of an HF folder exist and hold every tensor the config needs (headers only)."""
    from orchestra.model.hf import HFImportError, hf_weight_names

    try:
        hf_weight_names(path, cfg)
    except (HFImportError, FileNotFoundError) as err:
        raise ConfigError(f"finetune.init_from: {path}: {err}") from err


def load_base_weights(init_from: str | Path, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """A base's full fp32 weights under our parameter names (an HF folder or any Orchestra layout)."""
    from orchestra.model.hf import HFImportError, from_hf_state_dict, load_hf_state_dict

    path = Path(init_from)
    if _is_hf_folder(path):
        try:
            return from_hf_state_dict(load_hf_state_dict(path), cfg)
        except (HFImportError, FileNotFoundError) as err:
            raise ConfigError(f"finetune.init_from: {path}: {err}") from err
    try:
        state, _ = consolidated_state_dict(path)
    except CheckpointError as err:
        raise ConfigError(f"finetune.init_from: {err}") from err
    return state


def base_model_config(base: BaseModel, current: ModelConfig) -> ModelConfig:
    """The base's shape with the run's own kernel choice (numerics-neutral, device-dependent)."""
    return replace(base.model_config, vocab_size=base.vocab_size, kernels=current.kernels)


def apply_method(model: nn.Module, cfg: FinetuneConfig) -> nn.Module:
    """Turn a model holding the base weights into the configured trainable model (the method's spec).

    LoRA and adapters change ``model`` in place; prompt tuning wraps it in a
    :class:`~orchestra.model.peft.PromptTunedModel`. Returns the model to train.
    """
    return method_spec(cfg.method).apply(model, cfg)


def peft_record(cfg: FinetuneConfig, reference: BaseRef) -> PeftRecord:
    """What a PEFT checkpoint records: enough to rebuild base + method from the checkpoint alone."""
    return PeftRecord(FinetuneMethod(cfg.method).value, to_plain(cfg), reference)


def with_task_head(decoder: nn.Module, meta: CheckpointMeta) -> nn.Module:
    """The checkpoint's task model around a decoder: a SequenceClassifier for task=classification."""
    if meta.is_classifier:
        return SequenceClassifier(decoder, len(meta.labels))  # type: ignore[arg-type]
    return decoder


def rebuild_peft_model(
    trainable: dict[str, torch.Tensor], meta: CheckpointMeta | dict[str, Any], source: Path
) -> nn.Module:
    """Base + method from a PEFT checkpoint's reference, with its trainable tensors loaded."""
    from orchestra.model import build_model

    meta = CheckpointMeta.from_dict(meta, source)
    peft = meta.peft
    if peft is None:
        raise CheckpointError(f"checkpoint {source} is not a PEFT checkpoint: it holds the whole model")
    try:
        base = load_base(peft.base.path)
    except ConfigError as err:
        raise CheckpointError(f"checkpoint {source}: its base model cannot be loaded: {err}") from err
    if base.reference.sha256 != peft.base.sha256:
        raise CheckpointError(
            f"checkpoint {source}: base {peft.base.path} has changed since training (sha256 "
            f"{base.reference.sha256[:12]} != recorded {peft.base.sha256[:12]})"
        )
    decoder = build_model(meta.model_config, meta.vocab_size, init=False)
    decoder.load_state_dict(base.state_dict, strict=True)
    model = apply_method(with_task_head(decoder, meta), peft.finetune_config())
    if isinstance(model, SequenceClassifier):
        model.score.requires_grad_(True)  # the head trains under every method (module.ClassificationModule)
    layout = {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}
    check_tensors(trainable, layout, source, f"the {peft.method} layout recorded in it")
    model.load_state_dict(trainable, strict=False)
    return model


@contextmanager
def peft_disabled(model: nn.Module) -> Iterator[None]:
    """Run ``model`` as its base: LoRA / DoRA layers off, adapters bypassed (DPO's reference).

    Exact, not approximate: a LoRA or DoRA layer then returns base(x) and an adapted sublayer its
    inner output, so no second copy of the base is needed.
    """
    from orchestra.model.peft import AdaptedModule, LoRALinear

    loras = [m for m in model.modules() if isinstance(m, LoRALinear)]
    adapted = [m for m in model.modules() if isinstance(m, AdaptedModule)]
    forwards = [m.adapter.forward for m in adapted]
    try:
        for lora in loras:
            lora.enabled = False
        for sub in adapted:
            sub.adapter.forward = torch.zeros_like  # type: ignore[method-assign, assignment]
        yield
    finally:
        for lora in loras:
            lora.enabled = True
        for sub, fwd in zip(adapted, forwards, strict=True):
            sub.adapter.forward = fwd  # type: ignore[method-assign]
