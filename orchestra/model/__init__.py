"""The Llama-style model: plain PyTorch, no distributed code (parallelism is applied from outside)."""

from orchestra.model.generate import generate
from orchestra.model.init import init_weights
from orchestra.model.peft import (
    L2SP,
    LoRALinear,
    PromptTunedModel,
    apply_adapters,
    apply_lora,
    layerwise_lr_groups,
    merge_lora,
    trainable_state_dict,
)
from orchestra.model.transformer import KVCache, Transformer

__all__ = [
    "L2SP",
    "KVCache",
    "LoRALinear",
    "PromptTunedModel",
    "Transformer",
    "apply_adapters",
    "apply_lora",
    "generate",
    "init_weights",
    "layerwise_lr_groups",
    "merge_lora",
    "trainable_state_dict",
]
