"""Optimizer parameter groups and learning-rate schedules.

Schedules are multipliers of the peak lr, expressed as plain functions of the optimizer step so
they can be plotted, tested and wrapped in ``torch.optim.lr_scheduler.LambdaLR``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from orchestra.config import OptimConfig, ScheduleName, SchedulerConfig


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split trainable parameters into decayed (matrices) and not decayed (norms, embeddings).

    Weight decay on norm gains pulls them toward zero and on embeddings penalises rare tokens;
    neither helps, so both are excluded (as in GPT-3 / Llama recipes), and so are soft prompts,
    which are input embeddings too. A tied embedding shares its tensor with the lm head and is
    therefore listed once, without decay.
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if p.ndim < 2 or id(p) in embedding_ids or "norm" in name or "soft_prompt" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay, "name": "decay"})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "name": "no_decay"})
    return groups


def build_optimizer(
    model: nn.Module, cfg: OptimConfig, cpu_offload: bool = False, groups: list[dict] | None = None
) -> torch.optim.Optimizer:
    """AdamW over ``groups`` (default: :func:`parameter_groups`; groups may carry their own lr)."""
    if groups is None:
        groups = parameter_groups(model, cfg.weight_decay)
    if cpu_offload:
        # ZeRO-Offload keeps optimizer state in CPU memory; DeepSpeed's vectorised CPU Adam is
        # several times faster there than torch's (and is what DeepSpeed expects).
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, adamw_mode=True)
    # foreach is the fast path on both CPU and GPU; fused AdamW is CUDA-only in older torch.
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, foreach=True)


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
