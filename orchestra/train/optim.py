"""Optimizer parameter groups, regularisers and learning-rate schedules.

Schedules are multipliers of the peak lr, expressed as plain functions of the optimizer step so
they can be plotted, tested and wrapped in ``torch.optim.lr_scheduler.LambdaLR``. Fine-tuning's
optimiser-side techniques live here too: layer-wise learning-rate decay
(:func:`layerwise_lr_groups`) and the L2-SP penalty (:class:`L2SP`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from orchestra.config import OptimConfig, ScheduleName, SchedulerConfig
from orchestra.model.peft import is_new_parameter


def embedding_ids(model: nn.Module) -> set[int]:
    """ids of the embedding tables' weights (a tied lm_head shares one of them)."""
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}


def skips_weight_decay(name: str, p: torch.Tensor, embeddings: set[int]) -> bool:
    """The one no-decay rule: norms, embeddings (ids from :func:`embedding_ids`), biases, soft prompts.

    Weight decay on norm gains pulls them toward zero and on embeddings penalises rare tokens;
    neither helps, so both are excluded (as in GPT-3 / Llama recipes), and so are soft prompts,
    which are input embeddings too. Vectors (gains, biases) are never decayed.
    """
    return p.ndim < 2 or id(p) in embeddings or "norm" in name or "soft_prompt" in name


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Split trainable parameters into decayed (matrices) and not decayed (:func:`skips_weight_decay`).

    A tied embedding shares its tensor with the lm head and is therefore listed once, without decay.
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    embeddings = embedding_ids(model)
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if skips_weight_decay(name, p, embeddings):
            no_decay.append(p)
        else:
            decay.append(p)
    groups: list[dict[str, Any]] = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay, "name": "decay"})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "name": "no_decay"})
    return groups


_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layerwise_lr_groups(
    model: nn.Module, base_lr: float, decay: float, weight_decay: float
) -> list[dict[str, Any]]:
    """Optimizer param groups where lower blocks learn slower: block i of L gets base_lr * decay^(L-i).

    Layer-wise learning-rate decay (ULMFiT / ELECTRA). Input embeddings get decay^(L+1); the
    final norm, lm_head and anything outside the blocks (e.g. a soft prompt) get base_lr. A tied
    embedding is the output head too and gets base_lr. Only trainable parameters are included,
    split by the same rule as :func:`parameter_groups` (:func:`skips_weight_decay`). Groups are
    named ``"layer{i}.decay"``, ``"embeddings.no_decay"``, ``"head.decay"`` and so on, and carry ``lr``.
    """
    if not 0 < decay <= 1:
        raise ValueError(f"layer-wise lr decay must be in (0, 1], got {decay}")
    indices = [int(m.group(1)) for n, _ in model.named_parameters() if (m := _LAYER_RE.search(n))]
    if not indices:
        raise TypeError(
            f"{type(model).__name__} has no 'layers.<i>.' parameters; expected an orchestra Transformer"
        )
    L = max(indices) + 1
    head_ids = {
        id(m.weight)
        for n, m in model.named_modules()
        if n.split(".")[-1] == "lm_head" and hasattr(m, "weight")
    }
    embeddings = embedding_ids(model)

    groups: dict[str, dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if (match := _LAYER_RE.search(name)) is not None:
            i = int(match.group(1))
            level, lr = f"layer{i}", base_lr * decay ** (L - i)
        elif id(p) in embeddings and id(p) not in head_ids:
            level, lr = "embeddings", base_lr * decay ** (L + 1)
        else:
            level, lr = "head", base_lr
        no_decay = skips_weight_decay(name, p, embeddings)
        key = f"{level}.{'no_decay' if no_decay else 'decay'}"
        group = groups.setdefault(
            key, {"params": [], "lr": lr, "weight_decay": 0.0 if no_decay else weight_decay, "name": key}
        )
        group["params"].append(p)
    return list(groups.values())


class L2SP:
    """L2-SP: strength/2 * sum ||w - w0||^2 over trainable pretrained weights (Li et al. 2018).

    Unlike weight decay, which pulls toward zero, this pulls toward the starting point, so the
    fine-tuned model forgets less. w0 is a detached copy taken at construction: create it after
    loading pretrained weights (and after sharding, so w0 shards like w). PEFT-created
    parameters have no pretrained value and are excluded by default (``exclude``).
    """

    def __init__(
        self, model: nn.Module, strength: float, exclude: Callable[[str], bool] | None = is_new_parameter
    ) -> None:
        if strength < 0:
            raise ValueError(f"L2-SP strength must be >= 0, got {strength}")
        self.strength = strength
        self.reference: dict[str, torch.Tensor] = {
            n: p.detach().clone()
            for n, p in model.named_parameters()
            if p.requires_grad and not (exclude is not None and exclude(n))
        }

    def penalty(self, model: nn.Module) -> torch.Tensor:
        """The penalty as a differentiable scalar (add it to the task loss)."""
        params = dict(model.named_parameters())
        missing = [n for n in self.reference if n not in params]
        if missing:
            raise KeyError(
                f"L2-SP reference parameters {missing[:3]} are not in the model; was it re-wrapped?"
            )
        total = torch.zeros((), device=next(iter(params.values())).device, dtype=torch.float32)
        for name, w0 in self.reference.items():
            total = total + (params[name].float() - w0.float()).pow(2).sum()
        return total * (self.strength / 2)

    def to(self, device: torch.device | str) -> L2SP:
        """Move the reference weights (e.g. next to the model after it was moved)."""
        self.reference = {n: t.to(device) for n, t in self.reference.items()}
        return self


def fused_adamw(cfg: OptimConfig, groups: list[dict[str, Any]], deepspeed: bool = False) -> bool:
    """``optim.fused``, or where it is null: fused when every parameter is on CUDA, outside DeepSpeed."""
    if cfg.fused is not None:
        return cfg.fused
    return not deepspeed and all(p.is_cuda for group in groups for p in group["params"])


def build_optimizer(
    model: nn.Module,
    cfg: OptimConfig,
    cpu_offload: bool = False,
    groups: list[dict[str, Any]] | None = None,
    deepspeed: bool = False,
) -> torch.optim.Optimizer:
    """AdamW over ``groups`` (default: :func:`parameter_groups`; groups may carry their own lr)."""
    if groups is None:
        groups = parameter_groups(model, cfg.weight_decay)
    beta1, beta2 = cfg.betas  # validate() has checked there are two
    if cpu_offload:
        # ZeRO-Offload keeps optimizer state in CPU memory; DeepSpeed's vectorised CPU Adam is
        # several times faster there than torch's (and is what DeepSpeed expects).
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=cfg.lr, betas=(beta1, beta2), eps=cfg.eps, adamw_mode=True)
    # The fused kernel updates every parameter in one launch per group; foreach, a few launches
    # per op over lists of tensors. Both run on CPU too (the tests compare them there).
    fused = fused_adamw(cfg, groups, deepspeed)
    return torch.optim.AdamW(
        groups, lr=cfg.lr, betas=(beta1, beta2), eps=cfg.eps, foreach=not fused, fused=fused
    )


def lr_multiplier(cfg: SchedulerConfig, max_steps: int) -> Callable[[int], float]:
    """Return f(step) -> multiplier of the peak lr for the configured schedule.

    - cosine: linear warmup, then cosine from 1 down to min_lr_ratio at max_steps.
    - step: linear warmup, then multiply by gamma every step_size steps.
    - wsd: warmup-stable-decay: warmup, constant, then a linear decay to min_lr_ratio over the
      last decay_fraction of training (MiniCPM / DeepSeek style).
    - constant: linear warmup, then 1.
    """
    warmup = cfg.warmup_steps
    floor = cfg.min_lr_ratio

    def warm(step: int) -> float | None:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        return None

    if cfg.name == ScheduleName.cosine:

        def cosine(step: int) -> float:
            w = warm(step)
            if w is not None:
                return w
            progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

        return cosine

    if cfg.name == ScheduleName.step:

        def step_decay(step: int) -> float:
            w = warm(step)
            if w is not None:
                return w
            return cfg.gamma ** ((step - warmup) // cfg.step_size)

        return step_decay

    if cfg.name == ScheduleName.wsd:
        decay_steps = max(1, round(cfg.decay_fraction * max_steps))
        decay_start = max(warmup, max_steps - decay_steps)

        def wsd(step: int) -> float:
            w = warm(step)
            if w is not None:
                return w
            if step < decay_start:
                return 1.0
            progress = min(1.0, (step - decay_start) / max(1, max_steps - decay_start))
            return 1.0 - (1.0 - floor) * progress

        return wsd

    if cfg.name == ScheduleName.constant:

        def constant(step: int) -> float:
            w = warm(step)
            return 1.0 if w is None else w

        return constant

    raise ValueError(f"scheduler.name: unknown schedule {cfg.name!r}")


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: SchedulerConfig, max_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    # LambdaLR stores no closure in its state_dict (only step counters), so checkpoints stay
    # loadable with weights_only=True.
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(cfg, max_steps))
