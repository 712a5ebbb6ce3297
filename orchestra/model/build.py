"""Building a model: modules on the meta device, memory once on the target device, then init.

Constructing on the meta device costs no memory and no random numbers, so a large model is
allocated exactly once, where it will run, and a model whose weights are about to be loaded
(a base to fine-tune, a checkpoint, a Hugging Face folder) is never randomly initialised first.
A model whose weights are already in memory (:func:`load_into_meta_model`) is not allocated at
all: its parameters become the loaded tensors, so the weights are never held twice.
"""

from __future__ import annotations

from collections.abc import Mapping

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


def load_into_meta_model(
    cfg: ModelConfig,
    vocab_size: int,
    state: Mapping[str, torch.Tensor],
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Transformer:
    """A :class:`Transformer` whose parameters *are* ``state``'s tensors: the weights exist once.

    The model is built on the meta device and ``state`` (a full state dict under our names) is
    loaded with ``assign=True``, strictly. A tensor already on ``device`` in ``dtype`` becomes the
    parameter as is (memory-mapped safetensors tensors stay memory-mapped: their private
    copy-on-write mapping is writable and never writes back to the file); any other is converted
    on its own, so at most one tensor is duplicated at a time while the caller still holds
    ``state`` (one tensor object under two names, as tied embeddings are, is converted once).

    ``device=None`` is torch's current default device and ``dtype=None`` the dtype the model's
    parameters get where it is built (torch's default dtype), as with :func:`build_model` inside a
    Lightning init context. Tied embeddings stay one Parameter; the RoPE tables are computed on
    ``device``. The parameters share memory with ``state``: changing one changes the other.
    """
    device = torch.device(device) if device is not None else torch.get_default_device()
    with torch.device("meta"):
        model = Transformer(cfg, vocab_size)
    targets = dict(model.named_parameters(remove_duplicate=False))
    converted: dict[str, torch.Tensor] = {}
    done: dict[int, torch.Tensor] = {}  # id(source) -> converted, so a tied tensor is converted once
    for name, tensor in state.items():
        target = targets.get(name)
        if target is None:  # not ours: load_state_dict's strict check names it
            converted[name] = tensor
            continue
        if id(tensor) not in done:
            want = dtype if dtype is not None else target.dtype
            done[id(tensor)] = tensor.detach().to(device=device, dtype=want)
        converted[name] = done[id(tensor)]
    del done
    model.load_state_dict(converted, strict=True, assign=True)
    if cfg.tie_embeddings:  # assign gave each module its own Parameter around the shared tensor
        model.lm_head.weight = model.tok_embeddings.weight
    model.reset_rope_cache(device)
    for name, buffer in list(model.named_buffers()):  # e.g. the local RoPE tables of a model without them
        if buffer.is_meta:
            if buffer.numel():  # pragma: no cover - a new buffer with values needs computing here
                raise RuntimeError(f"buffer {name} has no values after loading: compute it here")
            owner, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(owner), leaf, torch.empty_like(buffer, device=device))
    return model
