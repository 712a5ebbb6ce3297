"""Task heads on top of the decoder.

A head wraps a :class:`~orchestra.model.transformer.Transformer` instead of editing it, so the
model file and its Hugging Face name mapping stay as they are; the wrapped decoder lives under
``.model`` and the head's own weight under ``.score`` (the names of HF's
``LlamaForSequenceClassification``).
"""

from __future__ import annotations

import torch
from torch import nn

from orchestra.model.config import ModelConfig
from orchestra.model.transformer import Transformer


class SequenceClassifier(nn.Module):
    """Class logits (or, with one label, a scalar score) from the hidden state of each sequence's last real token.

    A causal decoder has seen the whole sequence only at its last position, so that token's
    final-norm hidden state is the sequence summary (as in GPT-1 and HF's Llama classifier).
    The LM head is not used; it is frozen so no optimizer state is spent on it.
    """

    def __init__(self, model: Transformer, num_labels: int) -> None:
        super().__init__()
        if num_labels < 1:
            raise ValueError(f"a classifier needs at least 1 label (1: a scalar score), got {num_labels}")
        self.model = model
        self.num_labels = num_labels
        w = model.tok_embeddings.weight
        self.score = nn.Linear(model.cfg.dim, num_labels, bias=False, device=w.device, dtype=w.dtype)
        nn.init.normal_(self.score.weight, std=model.cfg.init_std)
        if not model.cfg.tie_embeddings:
            model.lm_head.requires_grad_(False)

    @property
    def cfg(self) -> ModelConfig:
        return self.model.cfg

    def forward(self, tokens: torch.Tensor, last_index: torch.Tensor) -> torch.Tensor:
        """Logits [B, num_labels] in fp32; ``last_index`` [B] is each row's last real position."""
        h = self.model.hidden_states(tokens)
        pooled = h[torch.arange(tokens.shape[0], device=tokens.device), last_index]
        return self.score(pooled).float()
