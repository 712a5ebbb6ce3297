"""The Llama-style model: plain PyTorch, no distributed code (parallelism is applied from outside).

Layout: config.py (ModelConfig), transformer.py (the model), build.py (build_model: meta-device
construction, then init.py's schemes), ops.py (fusable ops), generate.py (sampling), peft/
(LoRA, adapters, prompt tuning, freezing), heads.py (task heads), rope.py (RoPE scalings),
families/ (one file per Hugging Face family), hf.py (Hugging Face tensors and folders).
Nothing in model/ imports orchestra.config (the run's schema imports this package's config).
"""

from orchestra.model.build import build_model
from orchestra.model.config import InitScheme, KernelBackend, ModelConfig
from orchestra.model.generate import generate
from orchestra.model.init import init_weights
from orchestra.model.peft import LoRALinear, PromptTunedModel, apply_adapters, apply_lora, merge_lora
from orchestra.model.transformer import IGNORE_INDEX, KVCache, Transformer

__all__ = [
    "IGNORE_INDEX",
    "InitScheme",
    "KVCache",
    "KernelBackend",
    "LoRALinear",
    "ModelConfig",
    "PromptTunedModel",
    "Transformer",
    "apply_adapters",
    "apply_lora",
    "build_model",
    "generate",
    "init_weights",
    "merge_lora",
]
