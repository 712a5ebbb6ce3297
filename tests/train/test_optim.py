"""Parameter groups and the learning-rate schedules' curves."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from orchestra.config import ModelConfig, OptimConfig, ScheduleName, SchedulerConfig
from orchestra.model import Transformer
from orchestra.train.optim import (
    build_optimizer,
    build_scheduler,
    layerwise_lr_groups,
    lr_multiplier,
    parameter_groups,
)

MAX_STEPS = 1000


def curve(cfg: SchedulerConfig) -> list[float]:
    f = lr_multiplier(cfg, MAX_STEPS)
    return [f(s) for s in range(MAX_STEPS + 1)]


def test_warmup_is_linear_for_every_schedule() -> None:
    for name in ScheduleName:
        c = curve(SchedulerConfig(name=name, warmup_steps=10))
        assert c[:10] == pytest.approx([(i + 1) / 10 for i in range(10)]), name


def test_cosine_reaches_floor_and_is_monotone() -> None:
    c = curve(SchedulerConfig(name=ScheduleName.cosine, warmup_steps=100, min_lr_ratio=0.1))
    assert c[100] == pytest.approx(1.0)
    assert c[MAX_STEPS] == pytest.approx(0.1)
    mid = 100 + (MAX_STEPS - 100) // 2
    assert c[mid] == pytest.approx(0.1 + 0.9 * 0.5, abs=1e-3)
    assert all(a >= b - 1e-12 for a, b in itertools.pairwise(c[100:]))


def test_step_decay_halves_every_step_size() -> None:
    c = curve(SchedulerConfig(name=ScheduleName.step, warmup_steps=0, step_size=300, gamma=0.5))
    assert c[0] == c[299] == 1.0
    assert c[300] == c[599] == 0.5
    assert c[900] == 0.125


def test_wsd_stable_then_linear_decay() -> None:
    c = curve(SchedulerConfig(name=ScheduleName.wsd, warmup_steps=50, decay_fraction=0.2, min_lr_ratio=0.0))
    assert c[50] == c[799] == 1.0
    assert c[900] == pytest.approx(0.5)
    assert c[MAX_STEPS] == pytest.approx(0.0)


def test_constant_after_warmup() -> None:
    c = curve(SchedulerConfig(name=ScheduleName.constant, warmup_steps=5))
    assert set(c[5:]) == {1.0}


def test_scheduler_drives_optimizer_lr() -> None:
    model = torch.nn.Linear(4, 4)
    opt = build_optimizer(model, OptimConfig(lr=1e-3))
    sched = build_scheduler(
        opt, SchedulerConfig(name=ScheduleName.cosine, warmup_steps=2, min_lr_ratio=0.0), 10
    )
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(5e-4)
    assert lrs[1] == pytest.approx(1e-3)
    assert lrs[-1] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 7 / 8)))


@pytest.mark.parametrize("tied", [False, True])
def test_no_weight_decay_on_norms_and_embeddings(tied: bool) -> None:
    cfg = ModelConfig(
        dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=16, tie_embeddings=tied
    )
    model = Transformer(cfg, 128)
    groups = parameter_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for p in groups[0]["params"]}
    no_decay = {names[id(p)] for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert not decay & no_decay
    assert all("norm" in n or "embeddings" in n for n in no_decay)
    assert "tok_embeddings.weight" in no_decay
    assert ("lm_head.weight" in decay) != tied
    n_params = len({id(p) for p in model.parameters()})
    assert len(decay) + len(no_decay) == n_params


@pytest.mark.parametrize("tied", [False, True])
def test_layerwise_groups_use_the_same_no_decay_rule(tied: bool) -> None:
    cfg = ModelConfig(
        dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=16, tie_embeddings=tied
    )
    model = Transformer(cfg, 128)

    def decayed(groups: list[dict], weight_decay: float) -> set[int]:
        return {id(p) for g in groups if g["weight_decay"] == weight_decay for p in g["params"]}

    plain = parameter_groups(model, 0.1)
    layered = layerwise_lr_groups(model, 1e-3, 0.5, weight_decay=0.1)
    assert decayed(layered, 0.1) == decayed(plain, 0.1)
    assert decayed(layered, 0.0) == decayed(plain, 0.0)


def _adamw_run(fused: bool | None, steps: int = 6) -> tuple[torch.optim.Optimizer, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = Transformer(
        ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=16), 50
    )
    opt = build_optimizer(model, OptimConfig(lr=1e-2, fused=fused))
    tokens = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        model(tokens[:, :-1], tokens[:, 1:]).backward()
        opt.step()
        opt.zero_grad()
    return opt, [p.detach().clone() for p in model.parameters()]


def test_fused_adamw_takes_foreach_steps() -> None:
    """optim.fused: torch's fused kernel and its foreach path give the same weights, up to rounding."""
    fused, fused_params = _adamw_run(True)
    foreach, foreach_params = _adamw_run(False)
    assert fused.defaults["fused"] and not fused.defaults["foreach"]
    assert foreach.defaults["foreach"] and not foreach.defaults["fused"]
    for a, b in zip(fused_params, foreach_params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_fused_adamw_default_follows_the_parameters() -> None:
    """null: fused on CUDA parameters only, never inside DeepSpeed's wrapper unless asked for."""
    from orchestra.train.optim import fused_adamw

    cpu = [{"params": [torch.zeros(2)]}]
    assert not fused_adamw(OptimConfig(), cpu)
    assert fused_adamw(OptimConfig(fused=True), cpu, deepspeed=True)
    opt, _ = _adamw_run(None, steps=1)
    assert opt.defaults["foreach"] and not opt.defaults["fused"]
