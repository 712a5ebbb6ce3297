"""FlexAttention for training rows: block masks of causal spans, sliding windows and packed documents.

A dense [B, 1, T, T] mask (packed rows, sliding windows) keeps SDPA off its flash and cuDNN
kernels: only the math and memory-efficient ones take a mask, and they read all T x T entries.
FlexAttention instead takes a :class:`BlockMask`, a per-tile summary of the mask, and skips the
tiles every query of which is masked out (past another document, outside the window), so a
packed batch costs what its documents cost, not what the row costs. Gemma 2's soft-capped scores
are a ``score_mod`` there, so they also avoid the written-out eager attention.

The masks are built once per forward and shared by the layers (:meth:`Transformer.attention_masks`
picks between this and dense masks); each layer takes the one of its span. On CUDA the kernel and
the mask builder run through ``torch.compile`` (FlexAttention's fused kernel only exists compiled;
inside a compiled block the call is traced in place). Elsewhere they run eagerly through FlexAttention's
reference implementation, which computes the same numbers from the full score matrix, forward
only: torch refuses its backward off CUDA, so training with flex needs a GPU (the CPU tests lift
that gate to check the reference's gradients against SDPA with the equivalent dense mask).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask
from torch.nn.attention.flex_attention import flex_attention as torch_flex_attention

from orchestra.model.config import ConfigError


@dataclass(frozen=True)
class BlockMasks:
    """The block masks of one forward: full-span causal, and windowed when some layer has a window."""

    full: BlockMask
    windowed: BlockMask | None = None  # None also when the window spans the whole row

    def of(self, window: int | None) -> BlockMask:
        """The mask of a layer with the model's window, or of a full-span layer (None)."""
        return self.full if window is None or self.windowed is None else self.windowed


def _mask_mod(segment_ids: torch.Tensor | None, window: int | None) -> Callable[..., torch.Tensor]:
    """FlexAttention's mask_mod: query q sees key k when k <= q, in its window and in its document."""

    def causal(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        keep = k <= q
        if window is not None:
            keep = keep & (q - k < window)
        if segment_ids is not None:
            keep = keep & (segment_ids[b, q] == segment_ids[b, k])
        return keep

    return causal


@functools.cache
def _compiled_block_mask() -> Callable[..., BlockMask]:
    return torch.compile(create_block_mask)


@functools.cache
def _compiled_flex() -> Callable[..., torch.Tensor]:
    # torch's automatic dynamic shapes: a second row length (evaluation batches) compiles one
    # kernel for every length instead of one per length.
    return torch.compile(torch_flex_attention)


def block_masks(
    segment_ids: torch.Tensor | None,
    batch: int,
    length: int,
    window: int | None,
    device: torch.device,
) -> BlockMasks:
    """Block masks for rows of ``length`` tokens (``segment_ids`` [B, T] for packed rows).

    Rows without documents have one mask per length and window: built once, then reused.
    """
    if segment_ids is None:
        return _row_masks(length, window, device)
    return _build(segment_ids, batch, length, window, device)


@functools.lru_cache(maxsize=16)
def _row_masks(length: int, window: int | None, device: torch.device) -> BlockMasks:
    return _build(None, 1, length, window, device)


def _build(
    segment_ids: torch.Tensor | None, batch: int, length: int, window: int | None, device: torch.device
) -> BlockMasks:
    build = _compiled_block_mask() if device.type == "cuda" else create_block_mask
    # Without documents every row has the same mask: one batch entry, broadcast over the rows.
    rows = batch if segment_ids is not None else None

    def make(span: int | None) -> BlockMask:
        return build(_mask_mod(segment_ids, span), rows, None, length, length, device=device)

    windowed = make(window) if window is not None and window < length else None
    return BlockMasks(full=make(None), windowed=windowed)


def flex_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: BlockMask,
    scale: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """FlexAttention of q [B, H, T, hd] over k, v [B, Hkv, T, hd] (grouped heads read in place)."""
    score_mod: Any = None
    if softcap is not None:
        cap = softcap

        def score_mod(score: torch.Tensor, b: Any, h: Any, q_idx: Any, k_idx: Any) -> torch.Tensor:
            return torch.tanh(score / cap) * cap

    kwargs = {
        "score_mod": score_mod,
        "block_mask": mask,
        "scale": scale,
        "enable_gqa": q.shape[1] != k.shape[1],
    }
    if q.is_cuda:
        return _compiled_flex()(q, k, v, **kwargs)
    with warnings.catch_warnings():
        # The eager reference warns that it is not the fused kernel; off CUDA that is the point.
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        try:
            return torch_flex_attention(q, k, v, **kwargs)
        except NotImplementedError as e:  # torch has no FlexAttention backward off CUDA
            raise ConfigError(
                f"model.attention=flex: {e} Use model.attention=auto or sdpa on {q.device.type}"
            ) from e
