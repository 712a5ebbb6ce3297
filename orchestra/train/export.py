"""Consolidate any training checkpoint into a Hugging Face Llama folder.

Checkpoint kinds: a single file (single device, DDP), a torch.distributed.checkpoint directory
(FSDP2, any number of shards) and a DeepSpeed ZeRO directory (stages 1-3). Each is turned into one
full fp32 state dict of our parameter names, checked against the model shape recorded in the
checkpoint, renamed to transformers' Llama names and written as safetensors with config.json and
the tokenizer files. The folder loads with ``AutoModelForCausalLM.from_pretrained``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from orchestra.config import ModelConfig, model_config_from_dict
from orchestra.train.checkpoint import (
    CheckpointError,
    is_deepspeed_checkpoint,
    is_sharded_checkpoint,
    load_checkpoint_file,
)

EOS_TOKEN = "<|endoftext|>"
_PREFIX = "model."


def _strip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our parameter names, whether saved from the LightningModule (model.*) or the bare model."""
    if any(k.startswith(_PREFIX) for k in state):
        return {k[len(_PREFIX):]: v for k, v in state.items() if k.startswith(_PREFIX)}
    return dict(state)


def _expected_shapes(cfg: ModelConfig, vocab_size: int) -> dict[str, torch.Size]:
    from orchestra.model import Transformer

    with torch.device("meta"):
        model = Transformer(cfg, vocab_size)
    return {k: v.shape for k, v in model.state_dict().items()}


def consolidated_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(full fp32 state dict with our names, Orchestra metadata) from any kind of checkpoint."""
    path = Path(path)
    if is_deepspeed_checkpoint(path):
        meta = load_checkpoint_file(path).get("orchestra")
        if meta is None:
            raise CheckpointError(f"DeepSpeed checkpoint {path} carries no Orchestra metadata (client state 'orchestra')")
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(path))
        return _strip(state), meta

    ckpt = load_checkpoint_file(path)  # a sharded dir yields its metadata only
    meta = ckpt.get("orchestra")
    if not isinstance(meta, dict) or "model_config" not in meta:
        raise CheckpointError(f"checkpoint {path} carries no Orchestra metadata (model config, tokenizer)")
    if not is_sharded_checkpoint(path):
        return _strip(ckpt["state_dict"]), meta

    import torch.distributed.checkpoint as dcp

    cfg = model_config_from_dict(meta["model_config"])
    shapes = _expected_shapes(cfg, int(meta["vocab_size"]))
    state = {"state_dict": {_PREFIX + k: torch.empty(shape) for k, shape in shapes.items()}}
    try:
        dcp.load(state, checkpoint_id=str(path), no_dist=True)
    except Exception as err:  # a shape or key mismatch surfaces as a planner error
        raise CheckpointError(f"sharded checkpoint {path} does not match its recorded model config: {err}") from err
    return _strip(state["state_dict"]), meta


def check_shapes(state: dict[str, torch.Tensor], cfg: ModelConfig, vocab_size: int, source: Path) -> None:
    expected = _expected_shapes(cfg, vocab_size)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {source} does not fit the model it records: missing tensors {missing[:5]}, "
            f"unexpected tensors {unexpected[:5]}"
        )
    for name, shape in expected.items():
        if state[name].shape != shape:
            raise CheckpointError(
                f"checkpoint {source}: tensor {name!r} has shape {tuple(state[name].shape)}, but the model "
                f"config recorded in it (dim={cfg.dim}, n_layers={cfg.n_layers}, ...) needs {tuple(shape)}"
            )


def _merged_peft_state(trainable: dict[str, torch.Tensor], meta: dict[str, Any], ckpt: Path) -> dict[str, torch.Tensor]:
    """A LoRA checkpoint holds its trainable tensors only: rebuild base + LoRA and merge them."""
    from orchestra.model.peft import merge_lora
    from orchestra.train.finetune import rebuild_peft_model

    method = meta["peft"]["method"]
    if method != "lora":
        raise CheckpointError(
            f"checkpoint {ckpt} is a {method} fine-tune: adapters add layers a Llama folder has no place for, "
            "so they cannot be merged into the Hugging Face weights; fine-tune with finetune=lora or full to export"
        )
    model = rebuild_peft_model(trainable, meta, ckpt)
    merge_lora(model)
    return {k: v.detach() for k, v in model.state_dict().items()}


def export_hf(ckpt: str | Path, out: str | Path, dtype: str = "float32", overwrite: bool = False) -> Path:
    """Write a Hugging Face Llama folder for ``ckpt`` into ``out`` (atomically); returns ``out``."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer

    from orchestra.model.hf import hf_config_dict, to_hf_state_dict

    ckpt, out = Path(ckpt), Path(out)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
    if torch_dtype is None:
        raise ValueError(f"dtype: {dtype!r} is not one of float32, bfloat16, float16")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"out: {out} exists and is not empty; choose another folder or set overwrite=true")

    state, meta = consolidated_state_dict(ckpt)
    if "peft" in meta:
        state = _merged_peft_state(state, meta, ckpt)
    cfg = model_config_from_dict(meta["model_config"])
    vocab_size = int(meta["vocab_size"])
    check_shapes(state, cfg, vocab_size, ckpt)
    hf_state = {k: v.detach().to(torch_dtype).contiguous() for k, v in to_hf_state_dict(state, cfg).items()}

    tokenizer = Tokenizer.from_str(meta["tokenizer_json"])
    eos_id = tokenizer.token_to_id(EOS_TOKEN)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(hf_state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config = hf_config_dict(cfg, vocab_size, bos_id=eos_id, eos_id=eos_id, torch_dtype=dtype)
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (tmp / "generation_config.json").write_text(json.dumps({"bos_token_id": eos_id, "eos_token_id": eos_id}) + "\n")
    tokenizer.save(str(tmp / "tokenizer.json"))
    (tmp / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "model_max_length": cfg.max_seq_len,
        "clean_up_tokenization_spaces": False,
    }, indent=2) + "\n")
    (tmp / "special_tokens_map.json").write_text(json.dumps({"bos_token": EOS_TOKEN, "eos_token": EOS_TOKEN}) + "\n")
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(out)
    return out
