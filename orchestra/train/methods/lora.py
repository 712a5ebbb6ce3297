"""finetune=lora: low-rank updates beside frozen linear layers (Hu et al. 2021).

Checkpoints hold the LoRA tensors only; export merges them into the base weights, or writes
them alone in peft's LORA format (``adapter_config.json`` + ``adapter_model.safetensors``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from orchestra.config import ConfigError, FinetuneConfig, ModelConfig, TrainConfig, require
from orchestra.model.families import family
from orchestra.model.hf import name_map
from orchestra.model.peft import LoraConfig, apply_lora, merge_lora
from orchestra.train.checkpoint.meta import CheckpointError, CheckpointMeta, PeftRecord
from orchestra.train.methods.spec import PEFT_PREFIX, MethodSpec, PeftFiles, number, trainable_layout


def _validate(cfg: TrainConfig) -> None:
    f = cfg.finetune
    require(f.lora_rank > 0, "finetune.lora_rank", f"must be a positive integer, got {f.lora_rank}")
    require(f.lora_alpha > 0, "finetune.lora_alpha", f"must be positive, got {f.lora_alpha}")
    require(0 <= f.lora_dropout < 1, "finetune.lora_dropout", f"must be in [0, 1), got {f.lora_dropout}")
    require(
        len(f.lora_targets) > 0,
        "finetune.lora_targets",
        "needs at least one linear-layer suffix such as [q_proj, v_proj], or [all-linear]",
    )


def lora_config(cfg: FinetuneConfig, use_dora: bool) -> LoraConfig:
    return LoraConfig(
        rank=cfg.lora_rank,
        alpha=cfg.lora_alpha,
        dropout=cfg.lora_dropout,
        target_modules=list(cfg.lora_targets),
        use_dora=use_dora,
    )


def _apply_with(use_dora: bool) -> Callable[[nn.Module, FinetuneConfig], nn.Module]:
    def apply(model: nn.Module, cfg: FinetuneConfig) -> nn.Module:
        try:
            apply_lora(model, lora_config(cfg, use_dora))
        except ValueError as err:
            raise ConfigError(f"finetune.lora_targets: {err}") from err
        return model

    return apply


def peft_names(names: list[str], cfg: ModelConfig) -> dict[str, str]:
    """Our LoRA tensor name -> peft's, through hf.py's name map of the wrapped linear.

    layers.0.attention.q_proj.lora_A.weight -> base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight
    """
    weights = name_map(cfg)
    fused = family(cfg.family).fused
    out: dict[str, str] = {}
    for name in names:
        module, _, leaf = name.rpartition(".lora_")
        if fused and any(module.endswith(part) for parts in fused.values() for part in parts):
            raise CheckpointError(
                f"LoRA tensor {name!r} adapts {module}, which {family(cfg.family).architecture} stores fused "
                f"({', '.join(fused)}): peft has no adapter for one slice of a fused projection; export the "
                "merged model instead (orchestra-export without peft_only=true)"
            )
        if leaf not in ("A.weight", "B.weight", "magnitude_vector") or f"{module}.weight" not in weights:
            raise CheckpointError(
                f"LoRA tensor {name!r} is not a lora_A/lora_B weight (or DoRA magnitude) of a decoder projection"
            )
        hf_module = weights[f"{module}.weight"].removesuffix(".weight")
        out[name] = f"{PEFT_PREFIX}{hf_module}.lora_{leaf}"
    return out


def _target_modules(wrapped: set[str], cfg: ModelConfig) -> list[str] | str:
    """peft's ``target_modules`` selecting exactly the wrapped HF modules.

    Leaf names (["q_proj", "v_proj"]) when every layer has the same ones, as peft's own configs
    do; otherwise one anchored regex of the full names, which peft matches with re.fullmatch.
    """
    linears = {v.removesuffix(".weight") for v in name_map(cfg).values() if v.endswith("_proj.weight")}
    leaves = sorted({m.rpartition(".")[2] for m in wrapped})
    if {m for m in linears if m.rpartition(".")[2] in leaves} == wrapped:
        return leaves
    return "^(?:" + "|".join(re.escape(m) for m in sorted(wrapped)) + ")$"


def _peft_files(trainable: dict[str, torch.Tensor], cfg: ModelConfig, peft: PeftRecord) -> PeftFiles:
    """peft LORA adapter_config.json (use_dora for DoRA) + tensors under peft's key names."""
    ft = peft.config
    names = peft_names(sorted(trainable), cfg)
    tensors = {names[k]: v for k, v in trainable.items()}
    wrapped = {n.removeprefix(PEFT_PREFIX).rpartition(".lora_")[0] for n in names.values()}
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": peft.base.path,
        "revision": None,
        "inference_mode": True,
        "r": int(ft["lora_rank"]),
        "lora_alpha": number(ft["lora_alpha"]),
        "lora_dropout": float(ft["lora_dropout"]),
        "target_modules": _target_modules(wrapped, cfg),
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_rslora": False,  # our scale is alpha / r, peft's default
        "use_dora": any(name.endswith(".lora_magnitude_vector") for name in trainable),
    }
    return config, tensors, "peft"


def read_peft_files_with(
    apply: Callable[[nn.Module, FinetuneConfig], nn.Module],
) -> Callable[[dict[str, torch.Tensor], CheckpointMeta, Path], dict[str, torch.Tensor]]:
    def read(tensors: dict[str, torch.Tensor], meta: CheckpointMeta, folder: Path) -> dict[str, torch.Tensor]:
        ours = {
            theirs: name
            for name, theirs in peft_names(
                sorted(trainable_layout(meta, folder, apply)), meta.model_config
            ).items()
        }
        unknown = sorted(set(tensors) - set(ours))
        if unknown:
            raise CheckpointError(f"{folder}: tensors {unknown[:3]} are not LoRA weights of this model")
        return {ours[k]: v for k, v in tensors.items()}

    return read


def lora_spec(name: str, use_dora: bool) -> MethodSpec:
    """The spec of LoRA, or of DoRA (its weight-decomposed form, the same files with use_dora)."""
    apply = _apply_with(use_dora)
    return MethodSpec(
        name=name,
        frozen_base=True,
        apply=apply,
        merge=merge_lora,
        validate=_validate,
        peft_files=_peft_files,
        read_peft_files=read_peft_files_with(apply),
    )


SPEC = lora_spec("lora", use_dora=False)
