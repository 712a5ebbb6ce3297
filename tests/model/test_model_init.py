"""Initialisation schemes: empirical statistics against each documented formula."""

from __future__ import annotations

import math

import pytest
import torch

from orchestra.model import Transformer, build_model, init_weights
from orchestra.model.config import InitScheme

V = 512
D, L, FFN = 128, 4, 384


def _std(t: torch.Tensor) -> float:
    return t.detach().double().std().item()


def _build(make_cfg, scheme: InitScheme, tie: bool = False) -> Transformer:
    cfg = make_cfg(
        dim=D,
        n_layers=L,
        n_heads=4,
        n_kv_heads=2,
        ffn_dim=FFN,
        init=scheme,
        init_std=0.02,
        tie_embeddings=tie,
    )
    return build_model(cfg, V)


def _assert_close(actual: float, expected: float, what: str) -> None:
    assert actual == pytest.approx(expected, rel=0.05), f"{what}: std {actual:.5f}, expected {expected:.5f}"


def test_normal(make_cfg):
    m = _build(make_cfg, InitScheme.normal)
    layer = m.layers[1]
    _assert_close(_std(m.tok_embeddings.weight), 0.02, "embedding")
    _assert_close(_std(m.lm_head.weight), 0.02, "lm_head")
    _assert_close(_std(layer.attention.q_proj.weight), 0.02, "q_proj")
    _assert_close(_std(layer.mlp.gate_proj.weight), 0.02, "gate_proj")
    scaled = 0.02 / math.sqrt(2 * L)
    _assert_close(_std(layer.attention.o_proj.weight), scaled, "o_proj")
    _assert_close(_std(layer.mlp.down_proj.weight), scaled, "down_proj")


def test_xavier_uniform(make_cfg):
    m = _build(make_cfg, InitScheme.xavier_uniform)
    layer = m.layers[0]
    for name, w in [
        ("gate_proj", layer.mlp.gate_proj.weight),
        ("down_proj", layer.mlp.down_proj.weight),
        ("q_proj", layer.attention.q_proj.weight),
        ("lm_head", m.lm_head.weight),
    ]:
        fan_out, fan_in = w.shape
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        assert w.abs().max().item() <= bound, name
        _assert_close(_std(w), bound / math.sqrt(3.0), name)  # std of U(-a, a) is a / sqrt(3)
    _assert_close(_std(m.tok_embeddings.weight), 0.02, "embedding")


def test_kaiming_normal(make_cfg):
    m = _build(make_cfg, InitScheme.kaiming_normal)
    layer = m.layers[0]
    _assert_close(_std(layer.mlp.gate_proj.weight), 1 / math.sqrt(D), "gate_proj (fan_in = dim)")
    _assert_close(_std(layer.mlp.down_proj.weight), 1 / math.sqrt(FFN), "down_proj (fan_in = ffn_dim)")
    _assert_close(_std(m.lm_head.weight), 1 / math.sqrt(D), "lm_head")
    _assert_close(_std(m.tok_embeddings.weight), 0.02, "embedding")


def test_small(make_cfg):
    m = _build(make_cfg, InitScheme.small)
    layer = m.layers[2]
    small = math.sqrt(2.0 / (5 * D))
    _assert_close(_std(layer.attention.k_proj.weight), small, "k_proj")
    _assert_close(_std(layer.mlp.up_proj.weight), small, "up_proj")
    _assert_close(_std(m.tok_embeddings.weight), small, "embedding")
    _assert_close(_std(layer.mlp.down_proj.weight), small / math.sqrt(2 * L), "down_proj")
    _assert_close(_std(layer.attention.o_proj.weight), small / math.sqrt(2 * L), "o_proj")


@pytest.mark.parametrize("scheme", list(InitScheme))
def test_norms_are_ones_and_means_near_zero(make_cfg, scheme):
    m = _build(make_cfg, scheme)
    for name, p in m.named_parameters():
        if name.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p)), name
        else:
            assert abs(p.detach().double().mean().item()) < 0.1 * _std(p) + 1e-4, name


@pytest.mark.parametrize("scheme", list(InitScheme))
def test_tied_matrix_is_initialised_once_as_an_embedding(make_cfg, scheme):
    m = _build(make_cfg, scheme, tie=True)
    assert m.lm_head.weight is m.tok_embeddings.weight
    expected = math.sqrt(2.0 / (5 * D)) if scheme == InitScheme.small else 0.02
    _assert_close(_std(m.tok_embeddings.weight), expected, "tied embedding")


def test_generator_makes_init_reproducible(make_cfg):
    a = _build(make_cfg, InitScheme.normal)
    b = _build(make_cfg, InitScheme.normal)
    init_weights(a, a.cfg, generator=torch.Generator().manual_seed(7))
    torch.manual_seed(123)  # the global RNG must not matter
    init_weights(b, b.cfg, generator=torch.Generator().manual_seed(7))
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb), name
