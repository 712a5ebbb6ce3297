"""Building a model: modules on the meta device, memory once on the target device, then init.

Constructing on the meta device costs no memory and no random numbers, so a large model is
allocated exactly once, where it will run, and a model whose weights are about to be loaded
(a base to fine-tune, a checkpoint, a Hugging Face folder) is never randomly initialised first.
"""

from __future__ import annotations

import torch

from orchestra.model.config import ModelConfig
from orchestra.model.init import init_weights
from orchestra.model.transformer import Transformer


def build_model(
    cfg: ModelConfig, vocab_size: int, device: torch.device | str | None = None, init: bool = True
) -> Transformer:
    """A :class:`Transformer` on ``device`` with ``cfg.init`` applied, or uninitialised with ``init=False``.

    ``device=None`` is torch's current default device, so a caller inside a
    ``with torch.device(...)`` block (as Lightning's model-init contexts are) gets its device.
    With ``init=False`` the parameters hold whatever memory they were given: load a full state
    dict into them before use. The RoPE tables are always computed, since no state dict has them.
    """
    if device is None:
        device = torch.get_default_device()
    with torch.device("meta"):
        model = Transformer(cfg, vocab_size)
    model.to_empty(device=device)
    if cfg.tie_embeddings:  # to_empty gives each module its own copy of a shared meta parameter
        model.lm_head.weight = model.tok_embeddings.weight
    model.reset_rope_cache()
    if init:
        init_weights(model, cfg)
    return model
