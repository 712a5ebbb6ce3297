"""Which parameters train: gradual unfreezing, layer selection, and telling PEFT parameters apart."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

NEW_PARAM_MARKERS: tuple[str, ...] = ("lora_A", "lora_B", "adapter.", "soft_prompt.")
"""Substrings that mark parameters created by a PEFT method (they have no pretrained value)."""


def is_new_parameter(name: str) -> bool:
    """True for parameters a PEFT method created (LoRA, adapters, soft prompt)."""
    return any(marker in name for marker in NEW_PARAM_MARKERS)


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks (``model.layers``) that layer-wise methods work on."""
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(
            f"{type(model).__name__} has no .layers ModuleList; expected an orchestra Transformer"
        )
    return layers


def trainable_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters the optimizer should see (a tied tensor listed once)."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def unfreeze_schedule(n_layers: int, every_steps: int) -> Callable[[int], set[int]]:
    """Gradual unfreezing (ULMFiT): step -> indices of trainable blocks, top block first.

    The top block trains from step 0; every ``every_steps`` one more block below it joins, until
    all ``n_layers`` train. Upper layers are the most task-specific, so they adapt first while
    lower, more general features are protected from the early, large gradients.
    """
    if n_layers <= 0 or every_steps <= 0:
        raise ValueError(
            f"unfreeze_schedule needs n_layers > 0 and every_steps > 0, got {n_layers}, {every_steps}"
        )

    def layers_at(step: int) -> set[int]:
        k = min(n_layers, max(step, 0) // every_steps + 1)
        return set(range(n_layers - k, n_layers))

    return layers_at


def set_trainable_layers(model: nn.Module, layers: set[int], head: bool = True) -> None:
    """Make exactly ``layers`` trainable among the blocks; norm/lm_head follow ``head``.

    The input embeddings train only once block 0 does (the bottom of the network), unless they
    are tied to lm_head, in which case they are the head. Build the optimizer over every
    parameter that will ever train: AdamW skips parameters whose grad is None.
    """
    for i, block in enumerate(decoder_blocks(model)):
        block.requires_grad_(i in layers)
    tok = getattr(model, "tok_embeddings", None)
    if isinstance(tok, nn.Module):
        tok.requires_grad_(0 in layers)
    for name in ("norm", "lm_head"):
        mod = getattr(model, name, None)
        if isinstance(mod, nn.Module):
            mod.requires_grad_(head)  # with tied weights this also sets the embedding table
