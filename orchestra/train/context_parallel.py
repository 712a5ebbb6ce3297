"""Context parallelism (strategy.cp): the ranks of a group each hold a share of every sequence.

A sequence of T tokens is cut into 2·cp chunks and rank i keeps chunks i and 2·cp-1-i (the
load-balanced "zigzag" order torch's context_parallel and Megatron use): under a causal mask
early chunks attend to little and late ones to much, so pairing them gives every rank the same
attention work. Every activation of the step is then T/cp long; only attention needs the other
ranks' tokens, and gets them by an all-gather of keys and values inside each attention call,
the context parallelism Llama 3 was trained with (its paper, section 3.3.2). Gradients flow back
through the gather (a reduce-scatter), and FSDP averages the weights' gradients over the data
and context ranks together.

Why not torch's ``context_parallel``: it replaces only the fused SDPA kernels (flash, efficient,
cuDNN) with ring attention and has no rule for the CPU kernel, so it cannot run, or be checked,
on a machine without a GPU. The all-gather here is device-independent, exact, and keeps any
SDPA backend; with grouped-query attention its keys and values are small next to the queries.

Like torch's API this works from outside the model, by (1) sharding the batch, (2) handing the
decoder the RoPE rows of its positions for the step and (3) giving each attention layer an SDPA
that, during a step, runs the local queries against the gathered keys. (3) is an attribute the
layer calls rather than a function mode around the step, because a backward that recomputes a
checkpointed block runs on autograd's side, where no mode entered by the step is in force.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from orchestra.config import IGNORE_INDEX


def zigzag_positions(seq_len: int, rank: int, size: int, device: torch.device | None = None) -> torch.Tensor:
    """The positions rank ``rank`` of ``size`` holds: chunks rank and 2·size-1-rank of 2·size."""
    if seq_len % (2 * size) != 0:
        raise ValueError(f"a sequence of {seq_len} tokens does not split into 2 x {size} equal chunks")
    chunk = seq_len // (2 * size)
    first = torch.arange(rank * chunk, (rank + 1) * chunk, device=device)
    last = torch.arange((2 * size - 1 - rank) * chunk, (2 * size - rank) * chunk, device=device)
    return torch.cat([first, last])


class ContextParallel:
    """One rank's view of its context-parallel group (the mesh's ``context_parallel`` dim).

    :meth:`install` gives every attention layer :meth:`attention` as its SDPA. It splits nothing
    until :meth:`active` says a step over sharded rows of some length is running (the forward,
    and the backward that may recompute checkpointed blocks); otherwise (the end-of-run sample,
    a KV cache) it is plain SDPA.
    """

    def __init__(self, group: Any, rank: int, size: int) -> None:
        self.group, self.rank, self.size = group, rank, size
        self._seq_len: int | None = None
        self._masks: dict[tuple[int, str], torch.Tensor] = {}

    @classmethod
    def of(cls, mesh: Any) -> ContextParallel:
        cp = mesh["context_parallel"]
        return cls(group=cp.get_group(), rank=cp.get_local_rank(), size=cp.size())

    def positions(self, seq_len: int, device: torch.device | None = None) -> torch.Tensor:
        return zigzag_positions(seq_len, self.rank, self.size, device)

    def install(self, decoder: nn.Module) -> None:
        for block in decoder.layers:  # type: ignore[union-attr]
            attention = block.attention
            kv_groups = int(attention.n_heads) // int(attention.n_kv_heads)
            attention.sdpa = partial(self.attention, kv_groups=kv_groups)

    def shard(self, batch: Any) -> Any:
        """This rank's share of every [B, T] tensor of a batch (a (tokens, labels) pair or a dict)."""
        if isinstance(batch, dict):
            return {key: self._shard(value) for key, value in batch.items()}
        if isinstance(batch, (tuple, list)):
            return type(batch)(self._shard(value) for value in batch)
        return self._shard(batch)

    def _shard(self, value: Any) -> Any:
        if not isinstance(value, torch.Tensor) or value.dim() < 2:
            return value
        return value.index_select(1, self.positions(value.shape[1], value.device))

    @contextmanager
    def active(self, seq_len: int) -> Iterator[None]:
        """Attention over sharded rows of ``seq_len`` tokens, for a forward or a backward."""
        self._seq_len = seq_len
        try:
            yield
        finally:
            self._seq_len = None

    @contextmanager
    def rope(self, decoder: nn.Module, seq_len: int) -> Iterator[None]:
        """The decoder's RoPE rows for this rank's positions, for one forward.

        The decoder slices its cos/sin tables from position 0, so for the step they are replaced
        by the rows of this rank's positions (the tables are derived buffers, never saved).
        """
        cos, sin = decoder.rope_cos, decoder.rope_sin
        q_pos = self.positions(seq_len, cos.device)  # type: ignore[arg-type]
        decoder.rope_cos, decoder.rope_sin = cos[q_pos], sin[q_pos]  # type: ignore[index]
        try:
            yield
        finally:
            decoder.rope_cos, decoder.rope_sin = cos, sin

    def _mask(self, seq_len: int, device: torch.device) -> torch.Tensor:
        """[T/cp, T] bool: local query at position p sees the gathered keys at positions <= p."""
        key = (seq_len, str(device))
        if key not in self._masks:
            q_pos = self.positions(seq_len, device)
            # The gathered keys come in rank order: each rank's two chunks, one after the other.
            k_pos = torch.cat([zigzag_positions(seq_len, r, self.size, device) for r in range(self.size)])
            self._masks[key] = k_pos[None, :] <= q_pos[:, None]
        return self._masks[key]

    def attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
        kv_groups: int = 1,
    ) -> torch.Tensor:
        """SDPA; while :meth:`active`, local causal queries against the whole group's keys and values.

        Under GQA the block hands SDPA the key/value heads (``enable_gqa``) or, under
        model.attention=repeat_kv, ``kv_groups`` copies of each; only one copy of each head is
        gathered, so the traffic is the key/value heads', not the query heads'.
        """
        if self._seq_len is None:
            return F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=attn_mask,
                dropout_p=dropout_p,
                is_causal=is_causal,
                scale=scale,
                enable_gqa=enable_gqa,
            )
        if attn_mask is not None or not is_causal:
            raise RuntimeError(
                "strategy.cp: attention with its own mask (packed rows, sliding windows, a KV cache) "
                "cannot be split over the sequence"
            )
        from torch.distributed._functional_collectives import all_gather_single_autograd

        if kv_groups > 1 and k.shape[1] == q.shape[1]:  # repeat_kv laid a head's copies side by side
            k, v = k[:, ::kv_groups], v[:, ::kv_groups]
        k = all_gather_single_autograd(k.contiguous(), gather_dim=2, group=self.group)
        v = all_gather_single_autograd(v.contiguous(), gather_dim=2, group=self.group)
        if kv_groups > 1:
            # A dense mask: on CUDA only the memory-efficient kernel takes one, and not grouped heads.
            k, v = k.repeat_interleave(kv_groups, dim=1), v.repeat_interleave(kv_groups, dim=1)
        mask = self._mask(self._seq_len, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)

    def mean_loss(self, summed: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The group's token mean from this rank's summed loss, scaled for gradient averaging.

        Each rank returns cp · (its sum) / (the group's token count): the mean of those over the
        group, which FSDP's gradient average and the logged loss take, is the group's mean over
        all its tokens, whatever share of them each rank holds (padding and prompts are uneven).
        """
        import torch.distributed as dist

        count = (labels != IGNORE_INDEX).sum().to(torch.float64)
        dist.all_reduce(count, group=self.group)
        return summed * (self.size / count.clamp(min=1).to(summed.dtype))
