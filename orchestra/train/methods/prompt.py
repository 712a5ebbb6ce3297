"""finetune=prompt: learned virtual tokens prepended to every row (Lester et al. 2021).

The soft prompt takes the first context positions of every row, so the data's rows are that
much shorter; a PEFT-only export is peft's PROMPT_TUNING format.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from orchestra.config import (
    ConfigError,
    FinetuneConfig,
    ModelConfig,
    StrategyName,
    TaskName,
    TrainConfig,
    base_path,
    require,
)
from orchestra.model.peft import PromptTunedModel
from orchestra.train.checkpoint.meta import CheckpointError, CheckpointMeta, PeftRecord
from orchestra.train.methods.spec import MethodSpec, PeftFiles

SOFT_PROMPT = "soft_prompt.weight"
PEFT_PROMPT_KEY = "prompt_embeddings"


def _validate(cfg: TrainConfig) -> None:
    f, task, strategy = cfg.finetune, TaskName(cfg.task.name), cfg.strategy.name
    require(
        f.prompt_tokens > 0, "finetune.prompt_tokens", f"must be a positive integer, got {f.prompt_tokens}"
    )
    if not base_path(cfg):  # with a base, its own context decides (checked at load)
        require(
            f.prompt_tokens < cfg.model.max_seq_len,
            "finetune.prompt_tokens",
            f"{f.prompt_tokens} virtual tokens leave no room in model.max_seq_len={cfg.model.max_seq_len}",
        )
    # Only the soft prompt trains: there are no block weights for a per-layer learning rate.
    require(
        f.layer_lr_decay == 1,
        "finetune.layer_lr_decay",
        "does not apply to finetune=prompt (only the soft prompt trains)",
    )
    if f.seq_len is not None:
        require(
            f.prompt_tokens < f.seq_len,
            "finetune.prompt_tokens",
            f"{f.prompt_tokens} virtual tokens leave no room in finetune.seq_len={f.seq_len}",
        )
    require(
        task in (TaskName.pretrain, TaskName.sft),
        "finetune",
        f"finetune=prompt conditions generation; it does not apply to task={task.value}",
    )
    require(
        not (task == TaskName.sft and cfg.task.pack),
        "task.pack",
        "finetune=prompt prepends one soft prompt per row; set task.pack=false",
    )
    require(
        strategy in (StrategyName.single, StrategyName.ddp),
        "strategy",
        f"finetune=prompt runs under strategy=single or ddp (its few weights need no sharding), not {strategy.value}",
    )


def _apply(model: nn.Module, cfg: FinetuneConfig) -> nn.Module:
    try:
        return PromptTunedModel(model, cfg.prompt_tokens)  # type: ignore[arg-type]
    except ValueError as err:
        raise ConfigError(f"finetune.prompt_tokens: {err}") from err


def _reserved(cfg: FinetuneConfig) -> int:
    return cfg.prompt_tokens


def _peft_files(trainable: dict[str, torch.Tensor], cfg: ModelConfig, peft: PeftRecord) -> PeftFiles:
    """peft PROMPT_TUNING adapter_config.json + the [P, dim] soft prompt as "prompt_embeddings"."""
    prompt = trainable[SOFT_PROMPT]
    config: dict[str, Any] = {
        "peft_type": "PROMPT_TUNING",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": peft.base.path,
        "revision": None,
        "inference_mode": True,
        "num_virtual_tokens": int(prompt.shape[0]),
        "token_dim": int(prompt.shape[1]),
        "num_transformer_submodules": 1,
        "num_attention_heads": cfg.n_heads,
        "num_layers": cfg.n_layers,
        # RANDOM: peft initialises nothing from a tokenizer; the saved embeddings replace the init.
        "prompt_tuning_init": "RANDOM",
        "prompt_tuning_init_text": None,
        "tokenizer_name_or_path": None,
        "modules_to_save": None,
    }
    return config, {PEFT_PROMPT_KEY: prompt}, "peft"


def _read_peft_files(
    tensors: dict[str, torch.Tensor], meta: CheckpointMeta, folder: Path
) -> dict[str, torch.Tensor]:
    if set(tensors) != {PEFT_PROMPT_KEY}:
        raise CheckpointError(f"{folder}: expected one tensor {PEFT_PROMPT_KEY!r}, found {sorted(tensors)}")
    return {SOFT_PROMPT: tensors[PEFT_PROMPT_KEY]}


SPEC = MethodSpec(
    name="prompt",
    frozen_base=True,
    unmergeable="a soft prompt is extra input embeddings, not a change to any weight",
    apply=_apply,
    validate=_validate,
    reserved_positions=_reserved,
    peft_files=_peft_files,
    read_peft_files=_read_peft_files,
)
