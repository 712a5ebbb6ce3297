"""Weight initialisation schemes, selected by ``model.init``.

Kept apart from the model so that a meta-device build can materialise its parameters
(``to_empty``) and then call :func:`init_weights` once, on the real device (build.py does).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from orchestra.model.config import InitScheme, ModelConfig
from orchestra.model.transformer import RMSNorm, Transformer


def _is_output_projection(name: str) -> bool:
    """The projections that write into the residual stream (scaled down with depth)."""
    return name.endswith(("attention.o_proj", "mlp.down_proj"))


@torch.no_grad()
def init_weights(model: Transformer, cfg: ModelConfig, generator: torch.Generator | None = None) -> None:
    """Initialise every parameter of ``model`` in place according to ``cfg.init``.

    Schemes (D = cfg.dim, L = cfg.n_layers, sigma = cfg.init_std):

    - ``normal`` (GPT-2 / Megatron-LM): every linear and embedding weight ~ N(0, sigma); the
      residual output projections (o_proj, down_proj) use sigma / sqrt(2 L), because each of the
      2 L residual branches adds variance and the stream should not grow with depth.
    - ``xavier_uniform``: linear weights ~ U(-a, a), a = sqrt(6 / (fan_in + fan_out)) (Glorot &
      Bengio 2010); embeddings ~ N(0, sigma).
    - ``kaiming_normal``: linear weights ~ N(0, 1 / sqrt(fan_in)) (He et al. 2015, fan_in mode,
      linear gain: the pre-activations keep unit variance); embeddings ~ N(0, sigma).
    - ``small`` ("small init", Nguyen & Salazar 2019, as used by Le Scao et al. 2022 / GPT-NeoX):
      every linear and embedding weight ~ N(0, sqrt(2 / (5 D))), the output projections
      additionally scaled by 1 / sqrt(2 L); independent of sigma, it shrinks with width.

    RMSNorm gains are set to 1 (weights of 0 where the norm adds 1, as Gemma's does). A tied embedding / lm_head matrix is initialised once, as an
    embedding. ``generator`` makes the result independent of the global RNG.
    """
    scheme = InitScheme(cfg.init)
    depth_scale = 1.0 / math.sqrt(2 * cfg.n_layers)
    small_std = math.sqrt(2.0 / (5 * cfg.dim))
    seen: set[int] = set()

    for name, module in model.named_modules():
        if isinstance(module, RMSNorm):
            nn.init.constant_(module.weight, 1.0 - module.offset)  # a unit gain (Gemma stores w - 1)
        elif isinstance(module, nn.Embedding):
            if id(module.weight) in seen:
                continue
            seen.add(id(module.weight))
            std = small_std if scheme == InitScheme.small else cfg.init_std
            nn.init.normal_(module.weight, mean=0.0, std=std, generator=generator)
        elif isinstance(module, nn.Linear):
            if id(module.weight) in seen:  # lm_head tied to tok_embeddings
                continue
            seen.add(id(module.weight))
            _init_linear(
                module.weight, scheme, cfg, _is_output_projection(name), depth_scale, small_std, generator
            )
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    # named_modules visits tok_embeddings before lm_head, so a tied matrix got the embedding init.


def _init_linear(
    weight: torch.Tensor,
    scheme: InitScheme,
    cfg: ModelConfig,
    is_output: bool,
    depth_scale: float,
    small_std: float,
    generator: torch.Generator | None,
) -> None:
    """Initialise one linear weight [out, in] by scheme."""
    if scheme == InitScheme.normal:
        std = cfg.init_std * (depth_scale if is_output else 1.0)
        nn.init.normal_(weight, mean=0.0, std=std, generator=generator)
    elif scheme == InitScheme.xavier_uniform:
        nn.init.xavier_uniform_(weight, generator=generator)
    elif scheme == InitScheme.kaiming_normal:
        nn.init.kaiming_normal_(weight, mode="fan_in", nonlinearity="linear", generator=generator)
    elif scheme == InitScheme.small:
        std = small_std * (depth_scale if is_output else 1.0)
        nn.init.normal_(weight, mean=0.0, std=std, generator=generator)
    else:  # pragma: no cover - InitScheme() above already rejects unknown names
        raise ValueError(f"model.init: unknown scheme {scheme!r}")
