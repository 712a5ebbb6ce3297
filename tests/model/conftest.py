"""Small model configs shared by the model tests (dim 64, two layers: fast on CPU)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from orchestra.model.config import KernelBackend, ModelConfig


def tiny_config(**overrides: Any) -> ModelConfig:
    """A ModelConfig small enough that a forward pass takes milliseconds."""
    base: dict[str, Any] = dict(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=160, max_seq_len=64, kernels=KernelBackend.torch
    )
    base.update(overrides)
    return ModelConfig(**base)


@pytest.fixture
def make_cfg() -> Callable[..., ModelConfig]:
    return tiny_config


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
