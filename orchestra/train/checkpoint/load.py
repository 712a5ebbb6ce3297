"""A model ready to run, from any training checkpoint (the top layer of the checkpoint package).

io reads files and layouts, meta parses what a checkpoint says about itself, and this module
rebuilds the model -- for a PEFT checkpoint through the fine-tuning code, which itself only
reads checkpoints through io.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from orchestra.eval.model import EvalModel
from orchestra.train.checkpoint.io import consolidated_state_dict
from orchestra.train.checkpoint.meta import CheckpointError, CheckpointMeta
from orchestra.train.finetune import rebuild_peft_model, with_task_head
from orchestra.train.methods import method_spec


class LoadedModel(NamedTuple):
    model: nn.Module
    tokenizer: Any  # tokenizers.Tokenizer
    meta: CheckpointMeta


def load_model_from_checkpoint(
    path: str | Path, map_location: Any = "cpu", allow_classifier: bool = False
) -> LoadedModel:
    """The model (eval mode), its tokenizer and its metadata, from a training checkpoint.

    The model is a Transformer, or for a prompt-tuning checkpoint a PromptTunedModel around one
    (use orchestra.model.generate.context_length for the room left to real tokens). A PEFT
    checkpoint holds only the trainable tensors: the base it records is loaded and checked
    against its fingerprint, then the method is folded in where it can be (LoRA is merged, so
    sampling costs what the base model's does; adapters and a soft prompt stay attached).
    """
    from tokenizers import Tokenizer

    from orchestra.model import build_model

    path = Path(path)
    # Any layout: a file, a sharded (FSDP2) directory or a DeepSpeed directory, names stripped.
    state, meta = consolidated_state_dict(path)
    if meta.is_classifier and not allow_classifier:
        raise CheckpointError(
            f"checkpoint {path} is a sequence classifier (task=classification): it has "
            "no language-model head to generate with"
        )
    if not meta.tokenizer_json:
        raise CheckpointError(f"checkpoint {path} has no tokenizer")
    model: nn.Module
    if meta.peft is not None:
        spec = method_spec(meta.peft.method, path)
        if not Path(meta.peft.base.path).exists():
            raise CheckpointError(
                f"checkpoint {path} holds only the {spec.name} weights of a fine-tune; its base model "
                f"{meta.peft.base.path} does not exist (put the base back at that path: it is checked against "
                "the sha256 recorded at training)"
            )
        try:
            model = rebuild_peft_model(state, meta, path)
        except CheckpointError:
            raise
        except (KeyError, TypeError, ValueError, RuntimeError) as err:  # a malformed config or tensor shape
            raise CheckpointError(f"checkpoint {path}: cannot rebuild its {spec.name} model: {err}") from err
        if spec.merge is not None:
            spec.merge(model)
    else:
        model = with_task_head(build_model(meta.model_config, meta.vocab_size, init=False), meta)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise CheckpointError(f"checkpoint {path} does not match its own model config: {err}") from err
    if map_location not in (None, "cpu"):
        model.to(torch.device(map_location))
    try:
        tokenizer = Tokenizer.from_str(meta.tokenizer_json)
    except Exception as err:  # tokenizers raises a bare Exception for a malformed tokenizer.json
        raise CheckpointError(
            f"checkpoint {path}: its tokenizer is not a valid tokenizer.json ({err})"
        ) from None
    return LoadedModel(model.eval(), tokenizer, meta)


def load_for_eval(path: str | Path, device: Any = "cpu") -> EvalModel:
    """Any artifact orchestra-eval takes, as an :class:`~orchestra.eval.model.EvalModel`.

    A folder with config.json is an exported / Hugging Face model; anything else is a training
    checkpoint (a file or a sharded directory; a PEFT one rebuilt on its recorded base; a
    classifier with its head and labels).
    """
    from orchestra.eval.model import from_hf_folder, tokenizer_sha256

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"ckpt: {path} does not exist")
    if path.is_dir() and (path / "config.json").is_file():
        evaluated = from_hf_folder(path)
    else:
        model, tokenizer, meta = load_model_from_checkpoint(path, allow_classifier=True)
        evaluated = EvalModel(
            model=model,
            tokenizer=tokenizer,
            eos_ids=meta.stop_ids or (tokenizer.token_to_id("<|endoftext|>") or 0,),
            bos_id=meta.bos_id,
            add_bos=meta.bos_id is not None,
            chat_template=meta.chat_template,
            kind="peft checkpoint" if meta.peft is not None else "checkpoint",
            source=str(path),
            tokenizer_sha256=tokenizer_sha256(meta.tokenizer_json),
            labels=tuple(meta.labels),
        )
    evaluated.model.to(torch.device(device))
    return evaluated
