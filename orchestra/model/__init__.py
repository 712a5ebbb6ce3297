"""The Llama-style model: plain PyTorch, no distributed code (parallelism is applied from outside)."""

from orchestra.model.generate import generate
from orchestra.model.init import init_weights
from orchestra.model.transformer import KVCache, Transformer

__all__ = ["KVCache", "Transformer", "generate", "init_weights"]
