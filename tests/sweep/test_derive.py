"""Derived trial values (orchestra.sweep.derive) on composed-like configs, against independent
references: the head count and GQA grouping by hand, the FFN width by exact rational arithmetic,
and the FLOP budget against a real Transformer whose matmul weights are counted with torch."""

from __future__ import annotations

import copy
import math
import random
from fractions import Fraction
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from orchestra.config import ConfigError, TrainConfig
from orchestra.model.config import ModelConfig
from orchestra.model.transformer import Transformer
from orchestra.sweep.derive import Budget, DeriveConfig, derived_overrides, flops_per_token

BASE: dict[str, Any] = OmegaConf.to_container(  # type: ignore[assignment]
    OmegaConf.structured(TrainConfig), enum_to_str=True, resolve=True
)


def composed(**model: Any) -> dict[str, Any]:
    """The schema's defaults as a plain dict (what a composed trial config looks like), model keys set."""
    cfg = copy.deepcopy(BASE)
    cfg["model"].update(model)
    return cfg


def with_derived(config: dict[str, Any], derived: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(config)
    for key, value in derived.items():
        section, name = key.split(".")
        out[section][name] = value
    return out


# --------------------------------------------------------------------------- heads


def reference_kv_heads(n_heads: int, base_heads: int, base_kv: int) -> int:
    """Query heads per kv head: the base's group size, or the largest smaller one that divides."""
    group = base_heads // base_kv if base_heads % base_kv == 0 else 1
    best = max(g for g in range(1, group + 1) if n_heads % g == 0)
    return n_heads // best


@pytest.mark.parametrize(
    ("dim", "base_heads", "base_kv", "heads", "kv"),
    [
        (256, 4, 2, 4, 2),  # the base: groups of 2 kept
        (512, 4, 2, 8, 4),
        (384, 4, 2, 6, 3),
        (192, 4, 2, 3, 3),  # 3 heads cannot pair up: one kv head each
        (320, 8, 2, 5, 5),  # groups of 4 do not divide 5
        (384, 8, 2, 6, 2),  # groups of 4 do not divide 6, groups of 3 do
        (512, 8, 8, 8, 8),  # multi-head attention stays multi-head
        (512, 8, 1, 8, 1),  # multi-query stays multi-query
        (192, 8, 1, 3, 1),
        (448, 6, 4, 7, 7),  # 6 heads over 4 kv heads is no grouping at all: MHA
        (64, 4, 2, 1, 1),
    ],
)
def test_head_dim_sets_heads_and_keeps_grouping(
    dim: int, base_heads: int, base_kv: int, heads: int, kv: int
) -> None:
    config = composed(dim=dim, n_heads=base_heads, n_kv_heads=base_kv)
    out = derived_overrides(config, {}, DeriveConfig(head_dim=64))
    assert out == {"model.n_heads": heads, "model.n_kv_heads": kv}
    assert kv == reference_kv_heads(heads, base_heads, base_kv)
    ModelConfig.from_dict(
        {k: v for k, v in with_derived(config, out)["model"].items() if v is not None}
    ).validate()


def test_head_dim_random_against_reference() -> None:
    rng = random.Random(5)
    for _ in range(300):
        head_dim = rng.choice([16, 32, 64, 128])
        n_heads = rng.randint(1, 24)
        base_kv = rng.randint(1, 8)
        base_heads = base_kv * rng.randint(1, 6) if rng.random() < 0.8 else rng.randint(1, 24)
        config = composed(dim=head_dim * n_heads, n_heads=base_heads, n_kv_heads=base_kv)
        out = derived_overrides(config, {}, DeriveConfig(head_dim=head_dim))
        assert out["model.n_heads"] == n_heads
        kv = out["model.n_kv_heads"]
        assert kv == reference_kv_heads(n_heads, base_heads, base_kv), (n_heads, base_heads, base_kv)
        assert n_heads % kv == 0  # always a valid grouped-query shape


@pytest.mark.parametrize(("dim", "head_dim"), [(200, 64), (96, 64), (32, 64), (130, 128)])
def test_dim_not_a_multiple_of_head_dim(dim: int, head_dim: int) -> None:
    with pytest.raises(ConfigError, match=rf"model\.dim={dim} is not a multiple of head_dim={head_dim}"):
        derived_overrides(composed(dim=dim), {}, DeriveConfig(head_dim=head_dim))


def test_nothing_derived_without_settings() -> None:
    assert derived_overrides(composed(dim=320), {"optim.lr": 1e-3}, DeriveConfig()) == {}


# --------------------------------------------------------------------------- FFN ratio


def reference_ffn(ratio: float, dim: int, multiple: int) -> int:
    exact = Fraction(str(ratio)) * dim
    return math.ceil(exact / multiple) * multiple


@pytest.mark.parametrize(
    ("ratio", "dim", "multiple", "ffn"),
    [
        (4.0, 256, 64, 1024),
        (2.0, 128, 64, 256),
        (2.6667, 192, 64, 576),  # 512.0064 rounds *up*
        (2.6667, 256, 64, 704),  # 682.6752 -> 704
        (8 / 3, 192, 64, 512),
        (1.5, 100, 64, 192),
        (0.7, 320, 64, 256),
        (2.5, 256, 1, 640),
        (2.6667, 256, 0, 683),  # ffn_multiple_of 0 is treated as 1
        (3.5, 96, 256, 512),
    ],
)
def test_ffn_ratio_rounds_up_to_the_multiple(ratio: float, dim: int, multiple: int, ffn: int) -> None:
    out = derived_overrides(
        composed(dim=dim), {"arch.ffn_ratio": ratio}, DeriveConfig(ffn_multiple_of=multiple)
    )
    assert out == {"model.ffn_dim": ffn}


def test_ffn_ratio_random_against_exact_arithmetic() -> None:
    rng = random.Random(9)
    for _ in range(500):
        ratio = round(rng.uniform(0.5, 8.0), rng.randint(0, 4))
        dim = rng.choice([64, 96, 128, 192, 256, 320, 384, 512, 640, 768, 1024, 4096])
        multiple = rng.choice([1, 8, 32, 64, 128, 256])
        out = derived_overrides(
            composed(dim=dim), {"arch.ffn_ratio": ratio}, DeriveConfig(ffn_multiple_of=multiple)
        )
        assert out["model.ffn_dim"] == reference_ffn(ratio, dim, multiple), (ratio, dim, multiple)
        assert out["model.ffn_dim"] >= ratio * dim - 1e-9


# --------------------------------------------------------------------------- token budget


def test_token_budget_sets_max_steps() -> None:
    rng = random.Random(2)
    for _ in range(200):
        seq = rng.choice([64, 128, 256, 1024, 2048])
        batch = rng.choice([1, 4, 8, 16, 32, 512])
        tokens = rng.randint(1, 10**9)
        config = composed(max_seq_len=seq)
        config["trainer"]["global_batch_size"] = batch
        out = derived_overrides(config, {}, DeriveConfig(budget=Budget(tokens=tokens)))
        steps = out["trainer.max_steps"]
        exact = Fraction(tokens, batch * seq)
        assert steps >= 1
        if exact >= 1:
            assert abs(steps - exact) <= Fraction(1, 2), (tokens, batch, seq, steps)
        else:
            assert steps == 1
    config = composed(max_seq_len=256)
    config["trainer"]["global_batch_size"] = 16
    assert derived_overrides(config, {}, DeriveConfig(budget=Budget(tokens=2_000_000))) == {
        "trainer.max_steps": 488  # 2e6 / 4096 = 488.28
    }


def test_both_budgets_is_an_error() -> None:
    with pytest.raises(ConfigError, match="set tokens or flops, not both"):
        derived_overrides(composed(), {}, DeriveConfig(budget=Budget(tokens=10**6, flops=1e15)))


def test_budget_needs_batch_and_sequence() -> None:
    config = composed()
    del config["trainer"]["global_batch_size"]
    with pytest.raises(ConfigError, match="global_batch_size"):
        derived_overrides(config, {}, DeriveConfig(budget=Budget(tokens=10**6)))
    with pytest.raises(ConfigError, match="max_seq_len"):
        derived_overrides(composed(max_seq_len=0), {}, DeriveConfig(budget=Budget(flops=1e15)))


def test_flop_budget_needs_a_vocabulary() -> None:
    config = composed(vocab_size=None)
    config["data"]["vocab_size"] = None
    with pytest.raises(ConfigError, match="vocab_size"):
        derived_overrides(config, {}, DeriveConfig(budget=Budget(flops=1e15)))


# --------------------------------------------------------------------------- FLOP budget vs a real model


def matmul_parameters(m: ModelConfig, vocab: int) -> int:
    """Parameters of every nn.Linear weight of the real model (the lm head included, biases not)."""
    with torch.device("meta"):
        model = Transformer(m, vocab)
    return sum(mod.weight.numel() for mod in model.modules() if isinstance(mod, nn.Linear))


def visible_keys(seq: int, window: int | None) -> int:
    """(query, key) pairs a causal layer scores, counted on the mask itself."""
    i = torch.arange(seq)
    visible = i[None, :] <= i[:, None]
    if window is not None:
        visible &= i[:, None] - i[None, :] < window
    return int(visible.sum())


def reference_flops_per_token(m: ModelConfig, vocab: int) -> float:
    """6 x matmul weights + 12 x query width x keys per layer (full causal layer: T keys per
    query, a windowed one in proportion to its visible pairs), as orchestra.train.flops states."""
    seq = m.max_seq_len
    q_width = m.n_heads * m.head_size
    keys = 0.0
    for layer in range(m.n_layers):
        windowed = m.sliding_window is not None and (m.global_every == 0 or (layer + 1) % m.global_every != 0)
        pairs = visible_keys(seq, m.sliding_window if windowed else None)
        keys += seq * pairs / visible_keys(seq, None)
    return 6.0 * matmul_parameters(m, vocab) + 12.0 * q_width * keys


def model_of(config: dict[str, Any]) -> ModelConfig:
    return ModelConfig.from_dict({k: v for k, v in config["model"].items() if v is not None})


def padded(m: ModelConfig, data_vocab: int) -> int:
    """The embedding rows a run builds: model.vocab_size, else the tokenizer's rounded up to pad_vocab_to."""
    if m.vocab_size is not None:
        return m.vocab_size
    return math.ceil(data_vocab / m.pad_vocab_to) * m.pad_vocab_to


def random_trial(
    rng: random.Random, vocab_multiple_of_pad: bool = True
) -> tuple[dict[str, Any], dict[str, Any]]:
    dim = 64 * rng.randint(1, 8)
    seq = rng.choice([32, 64, 128, 256])
    config = composed(
        dim=dim,
        n_layers=rng.randint(1, 6),
        n_heads=rng.choice([2, 4, 8]),
        n_kv_heads=rng.choice([1, 2]),
        max_seq_len=seq,
        tie_embeddings=rng.random() < 0.3,
        vocab_size=rng.choice([None, None, 512, 1000, 32000]),
    )
    if rng.random() < 0.3:
        config["model"]["sliding_window"] = rng.randint(1, seq + 8)
        config["model"]["global_every"] = rng.choice([0, 2, 3])
    config["trainer"]["global_batch_size"] = rng.choice([1, 4, 8, 16])
    config["data"]["vocab_size"] = (
        64 * rng.randint(5, 80) if vocab_multiple_of_pad else 64 * rng.randint(5, 80) + 7
    )
    sampled = {"arch.ffn_ratio": rng.choice([2.0, 2.6667, 3.5, 4.0])}
    return config, sampled


def test_flop_budget_matches_a_real_model() -> None:
    rng = random.Random(17)
    for _ in range(40):
        config, sampled = random_trial(rng)
        budget = 10 ** rng.uniform(13, 17)
        out = derived_overrides(config, sampled, DeriveConfig(head_dim=64, budget=Budget(flops=budget)))
        trial = with_derived(config, out)
        m = model_of(trial)
        m.validate()
        per_token = reference_flops_per_token(m, padded(m, config["data"]["vocab_size"]))
        tokens_per_step = config["trainer"]["global_batch_size"] * m.max_seq_len
        exact = budget / (per_token * tokens_per_step)
        steps = out["trainer.max_steps"]
        if exact >= 1:
            assert abs(steps - exact) <= 0.5 + 1e-6 * exact, (config["model"], exact, steps)
        else:
            assert steps == 1
        # and the helper itself agrees with the real model
        assert flops_per_token(trial["model"], trial) == pytest.approx(per_token, rel=1e-12)


def test_flop_budget_bigger_model_fewer_steps() -> None:
    base = composed(dim=256, n_layers=4, max_seq_len=256)
    base["trainer"]["global_batch_size"] = 8
    cfg = DeriveConfig(head_dim=64, budget=Budget(flops=1e16))
    steps = []
    for n_layers in (2, 4, 8, 16):
        config = copy.deepcopy(base)
        config["model"]["n_layers"] = n_layers
        steps.append(derived_overrides(config, {}, cfg)["trainer.max_steps"])
    assert steps == sorted(steps, reverse=True) and len(set(steps)) == 4


def test_flop_budget_on_the_shipped_arch_study() -> None:
    """conf/sweep/arch.yaml's budget on the debug model at each searched width and depth."""
    config = composed()  # the debug model, data.vocab_size 4096, batch 8
    cfg = DeriveConfig(head_dim=64, ffn_multiple_of=64, budget=Budget(flops=2.0e14))
    for dim in (128, 192, 256, 320):
        for n_layers in (2, 4, 6, 8):
            trial_in = copy.deepcopy(config)
            trial_in["model"].update(dim=dim, n_layers=n_layers)
            out = derived_overrides(trial_in, {"arch.ffn_ratio": 2.6667}, cfg)
            m = model_of(with_derived(trial_in, out))
            per_token = reference_flops_per_token(m, 4096)
            exact = 2.0e14 / (per_token * 8 * 256)
            assert abs(out["trainer.max_steps"] - exact) <= 0.5


def test_bug_flop_budget_uses_the_padded_vocabulary() -> None:
    config = composed(dim=256, n_layers=4, max_seq_len=256)
    config["data"]["vocab_size"] = 5000  # a run builds ceil(5000 / 64) * 64 = 5056 rows
    config["trainer"]["global_batch_size"] = 8
    budget = 1e18
    out = derived_overrides(config, {}, DeriveConfig(budget=Budget(flops=budget)))
    per_token = reference_flops_per_token(model_of(config), 5056)
    exact = budget / (per_token * 8 * 256)
    assert abs(out["trainer.max_steps"] - exact) <= 0.5
