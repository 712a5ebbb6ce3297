"""A Llama-style decoder-only Transformer, readable top to bottom.

Pre-norm blocks (RMSNorm -> grouped-query attention with RoPE -> residual, RMSNorm -> SwiGLU
MLP -> residual), a final RMSNorm and an untied or tied output projection. Module and
parameter names are chosen so that the Hugging Face mappings (families/) are plain renames,
and the numerics follow transformers so imported and exported checkpoints give the same logits.

The other families are the same blocks with switches from :class:`ModelConfig`, not subclasses:
q/k/v biases (Qwen2), per-head q/k RMSNorm and a free head_dim (Qwen3), sliding-window layers
(Mistral, Phi-3, Gemma 2's alternate layers), Gemma's (1 + w) norms, GeGLU, sqrt(dim)-scaled
embeddings, sandwich norms and soft-capped attention scores and logits, and scaled RoPE (rope.py).

The model knows nothing of parallelism: no torch.distributed, no Lightning. FSDP, activation
checkpointing and compile are applied from outside (orchestra/train/strategy.py); the Block
modules are the natural wrapping unit. Fusable ops go through one handle built from
``model.kernels``, which picks the table for the device the tensors are on (see ops.py).

Constructing a :class:`Transformer` only builds its modules (with PyTorch's default init);
:func:`orchestra.model.build.build_model` builds it on the meta device, materialises it and
applies the configured initialisation (init.py), or leaves that out when weights will be loaded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from orchestra.model.config import IGNORE_INDEX, Activation, AttentionImpl, ModelConfig, SdpaBackend
from orchestra.model.flex import BlockMasks, block_masks, flex_attention
from orchestra.model.ops import DeviceOps, device_ops, softcap, torch_apply_rope
from orchestra.model.rope import length_dependent, local_rope_tables, original_length, rope_tables


@dataclass(frozen=True)
class RowPositions:
    """Where each row's tokens of one forward call go when rows are at different lengths.

    Continuous batching decodes sequences that started at different times in one batch: row b's
    tokens take positions ``positions[b]`` (in the cache too), and its queries see its own
    keys up to their position only. Built once per call by :meth:`Transformer.hidden_states`.
    """

    positions: torch.Tensor  # [B, T] long
    end: int  # one past the largest position: the keys attention reads


class KVCache:
    """Per-layer key/value buffers [B, n_kv_heads, max_len, head_dim] for incremental decoding.

    Keys are stored after RoPE, so a cached position never has to be rotated again. Windowed
    layers keep every position too and mask the old ones out, which keeps one layout for all.

    Prompts of different lengths share one cache left-padded (:meth:`set_left_padding`): every
    query then skips its row's padding keys. Rows keep the column positions, so a row's tokens
    sit ``pad`` positions later than on their own; RoPE scores depend on relative offsets only,
    so the outputs are the same up to rounding.
    """

    def __init__(
        self,
        batch_size: int,
        cfg: ModelConfig,
        max_len: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if max_len > cfg.max_seq_len:
            raise ValueError(f"KVCache max_len={max_len} exceeds model.max_seq_len={cfg.max_seq_len}")
        self.batch_size = batch_size
        self.max_len = max_len
        shape = (batch_size, cfg.n_kv_heads, max_len, cfg.head_size)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.key_valid: torch.Tensor | None = None  # [B, max_len] bool: False at padding
        # A per-row call's batch is rows first_row .. first_row + B - 1 (continuous batching
        # prefills newcomers into the rows after the running ones).
        self.first_row = 0

    def set_left_padding(self, pad: torch.Tensor) -> None:
        """Mark the first ``pad[b]`` positions of row b as padding, never attended to."""
        if pad.shape != (self.batch_size,) or bool((pad < 0).any()) or bool((pad >= self.max_len).any()):
            raise ValueError(
                f"left padding must be [{self.batch_size}] counts in [0, {self.max_len - 1}], "
                f"got {pad.tolist()}"
            )
        columns = torch.arange(self.max_len, device=pad.device)
        self.key_valid = columns[None, :] >= pad[:, None]

    def key_mask(self, length: int) -> torch.Tensor | None:
        """[B, 1, 1, length] bool (True = a real key) for the first ``length`` positions, or None."""
        if self.key_valid is None:
            return None
        return self.key_valid[:, None, None, :length]

    def update(
        self, layer: int, start_pos: int | RowPositions, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v [B, Hkv, T, hd] at start_pos and return all keys/values up to start_pos + T.

        With :class:`RowPositions` the batch is the cache's rows from ``first_row`` on, each
        written at its own positions; the keys returned run to the furthest row's end (the
        others mask the rest).
        """
        if isinstance(start_pos, RowPositions):
            lo, hi = self.first_row, self.first_row + k.shape[0]
            rows = torch.arange(lo, hi, device=k.device)[:, None]
            # Advanced indices on dims 0 and 2 around a slice: the target is [B, T, Hkv, hd].
            self.k[layer][rows, :, start_pos.positions] = k.transpose(1, 2)
            self.v[layer][rows, :, start_pos.positions] = v.transpose(1, 2)
            return self.k[layer][lo:hi, :, : start_pos.end], self.v[layer][lo:hi, :, : start_pos.end]
        end = start_pos + k.shape[2]
        self.k[layer][:, :, start_pos:end] = k
        self.v[layer][:, :, start_pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned gain (no bias, no mean subtraction).

    The gain is ``offset + weight``: offset 0 for Llama, 1 for Gemma (whose weights start at 0).
    """

    def __init__(self, dim: int, eps: float, ops: DeviceOps, offset: float = 0.0) -> None:
        super().__init__()
        self.eps = eps
        self.ops = ops
        self.offset = offset
        self.weight = nn.Parameter(torch.full((dim,), 1.0 - offset))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.rms_norm(x, self.weight, self.eps, self.offset)

    def add(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual), fused into one kernel where the ops table has one."""
        return self.ops.add_rms_norm(x, residual, self.weight, self.eps, self.offset)


_SDPA_ORDER = [
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
    SDPBackend.CUDNN_ATTENTION,
]
_SDPA_BACKENDS = {
    SdpaBackend.cudnn: SDPBackend.CUDNN_ATTENTION,
    SdpaBackend.flash: SDPBackend.FLASH_ATTENTION,
    SdpaBackend.efficient: SDPBackend.EFFICIENT_ATTENTION,
    SdpaBackend.math: SDPBackend.MATH,
}


def sdpa_priority(choice: SdpaBackend | str) -> list[SDPBackend] | None:
    """The SDPA backends in the order CUDA tries them: ``choice`` first, then torch's own order."""
    choice = SdpaBackend(choice)
    if choice == SdpaBackend.auto:
        return None
    first = _SDPA_BACKENDS[choice]
    return [first] + [b for b in _SDPA_ORDER if b != first]


class Attention(nn.Module):
    """Causal grouped-query self-attention: n_heads query heads share n_kv_heads key/value heads.

    A windowed layer (``cfg.is_windowed``) lets each query see itself and the
    ``sliding_window - 1`` positions before it, as transformers' sliding-window mask does.

    How the scores are computed is ``cfg.attention`` (all choices give the same outputs): SDPA
    reads the grouped key/value heads in place (``enable_gqa``), except where its kernel for the
    call cannot (a dense mask on CUDA, which only the memory-efficient kernel takes, without
    grouped heads; soft-capped scores, written out); FlexAttention takes the forward's block
    masks (orchestra/model/flex.py); repeat_kv copies the heads as transformers' eager code.
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int, ops: DeviceOps) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads
        self.head_dim = cfg.head_size
        self.ops = ops
        self.window = cfg.sliding_window if cfg.is_windowed(layer_idx) else None
        self.scale = cfg.attn_scale if cfg.attn_scale is not None else self.head_dim**-0.5
        self.softcap = cfg.attn_softcap
        self.repeat_kv = AttentionImpl(cfg.attention) == AttentionImpl.repeat_kv
        self.sdpa_backends = sdpa_priority(cfg.sdpa_backend)
        # The attention kernel, replaceable from outside the model: context parallelism
        # (orchestra/train/context_parallel.py) gathers the other ranks' keys in it.
        self.sdpa: Callable[..., torch.Tensor] = F.scaled_dot_product_attention
        hd = self.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * hd, cfg.dim, bias=cfg.o_bias)
        # Qwen3 / Gemma 3: one RMSNorm over each head's features, shared by all heads, before RoPE.
        self.q_norm = RMSNorm(hd, cfg.norm_eps, ops, cfg.norm_offset) if cfg.qk_norm else None
        self.k_norm = RMSNorm(hd, cfg.norm_eps, ops, cfg.norm_offset) if cfg.qk_norm else None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: KVCache | None,
        start_pos: int | RowPositions,
        attn_mask: torch.Tensor | BlockMasks | None = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        # [B, T, H*hd] -> [B, T, H, hd] (q/k norm acts here) -> [B, H, T, hd]. Head counts come
        # from the projections' outputs: under tensor parallelism each rank holds a share of them.
        q = self.q_proj(x).view(B, T, -1, self.head_dim)
        k = self.k_proj(x).view(B, T, -1, self.head_dim)
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if cos.dim() == 3:  # per-row positions: tables [B, T, hd], broadcast over heads
            q, k = torch_apply_rope(q.transpose(1, 2), k.transpose(1, 2), cos[:, None], sin[:, None])
        else:
            q, k = self.ops.apply_rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)

        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, start_pos, k, v)
            # The cache has its own dtype; under autocast q may be bf16 while the cache is fp32.
            k, v = k.to(q.dtype), v.to(q.dtype)

        if isinstance(attn_mask, BlockMasks):  # FlexAttention: training rows, no KV cache
            if kv_cache is not None or isinstance(start_pos, RowPositions):
                raise ValueError("FlexAttention block masks are for forwards without a KV cache")
            y = flex_attention(q, k, v, attn_mask.of(self.window), self.scale, self.softcap)
            return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))

        if isinstance(start_pos, RowPositions):
            mask: torch.Tensor | str | None = self._row_mask(start_pos, k.shape[2])
        else:
            pad_mask = kv_cache.key_mask(k.shape[2]) if kv_cache is not None else None
            mask = self._mask(T, k.shape[2], x.device, attn_mask, pad_mask)
        n_rep = q.shape[1] // k.shape[1]
        dense_on_cuda = isinstance(mask, torch.Tensor) and q.is_cuda
        if n_rep > 1 and (self.repeat_kv or self.softcap is not None or dense_on_cuda):
            k = k.repeat_interleave(n_rep, dim=1)
            v = v.repeat_interleave(n_rep, dim=1)
        y = self._softcapped(q, k, v, mask) if self.softcap is not None else self._sdpa(q, k, v, mask)
        y = y.transpose(1, 2).reshape(B, T, -1)
        return self.o_proj(y)

    def _sdpa(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | str | None
    ) -> torch.Tensor:
        """SDPA with the mask or is_causal, grouped heads read in place; the preferred kernel on CUDA."""
        kwargs: dict[str, object] = {"scale": self.scale, "enable_gqa": q.shape[1] != k.shape[1]}
        if isinstance(mask, torch.Tensor):
            kwargs["attn_mask"] = mask
        else:
            kwargs["is_causal"] = mask == "causal"
        if self.sdpa_backends is not None and q.is_cuda:
            with sdpa_kernel(self.sdpa_backends, set_priority=True):
                return self.sdpa(q, k, v, **kwargs)
        return self.sdpa(q, k, v, **kwargs)

    def _mask(
        self,
        T: int,
        S: int,
        device: torch.device,
        attn_mask: torch.Tensor | None,
        pad_mask: torch.Tensor | None = None,
    ) -> torch.Tensor | str | None:
        """Which of the S keys each of the T newest queries sees: a bool mask [.., T, S], or
        "causal" / None where SDPA's own is_causal / no mask says the same more cheaply.

        Query i sits at absolute position S - T + i (a KV cache holds the S - T before it).
        ``pad_mask`` [B, 1, 1, S] drops padding keys; a padding query still sees itself, so no
        row of scores is all -inf (SDPA would return NaN there, and NaN values poison later
        layers even through a zero attention weight).
        """
        windowed = self.window is not None and self.window < S
        if attn_mask is None and pad_mask is None and not windowed:
            if S == T:
                return "causal"
            if T == 1:
                return None  # one new token attends to everything cached before it
        q_pos = torch.arange(S - T, S, device=device)[:, None]
        k_pos = torch.arange(S, device=device)[None, :]
        mask = k_pos <= q_pos
        if windowed:
            assert self.window is not None
            mask = mask & (k_pos > q_pos - self.window)
        if attn_mask is not None:
            # Packed examples: causal within each example, nothing across (see Transformer.forward).
            mask = attn_mask & mask
        if pad_mask is not None:
            mask = (mask & pad_mask) | (k_pos == q_pos)
        return mask

    def _row_mask(self, rows: RowPositions, S: int) -> torch.Tensor:
        """[B, 1, T, S]: row b's query at position p sees its keys at positions <= p (and in the window)."""
        q_pos = rows.positions[:, None, :, None]
        k_pos = torch.arange(S, device=q_pos.device)
        mask = k_pos <= q_pos
        if self.window is not None:
            mask = mask & (k_pos > q_pos - self.window)
        return mask

    def _softcapped(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | str | None
    ) -> torch.Tensor:
        """Attention with soft-capped scores (Gemma 2), which no SDPA backend computes.

        Written out as transformers' eager attention: scores, cap, mask, fp32 softmax.
        """
        scores = torch.matmul(q, k.transpose(2, 3)) * self.scale
        scores = softcap(scores, self.softcap) if self.softcap is not None else scores
        if isinstance(mask, str):  # "causal"
            T, S = scores.shape[-2:]
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
        if isinstance(mask, torch.Tensor):
            scores = scores.masked_fill(~mask, float("-inf"))
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(weights, v)


class MLP(nn.Module):
    """Gated feed-forward: down(act(gate(x)) * up(x)), SwiGLU (silu) or GeGLU (gelu-tanh)."""

    def __init__(self, cfg: ModelConfig, ops: DeviceOps) -> None:
        super().__init__()
        self.ops = ops
        self.gate = ops.swiglu if Activation(cfg.activation) == Activation.silu else ops.geglu
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.gate(self.gate_proj(x), self.up_proj(x)))


class Block(nn.Module):
    """One pre-norm decoder layer; the unit that FSDP wrapping and activation checkpointing use.

    With ``sandwich_norm`` each sublayer's output is normed again before the residual add. The
    attention's residual add and the MLP's norm run as one fused op (``RMSNorm.add``) unless
    ``fuse_residual_norm`` is turned off from outside: tensor parallelism (train/strategy.py)
    does, because its sequence-parallel norms are entered through their module call.
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int, ops: DeviceOps) -> None:
        super().__init__()
        offset = cfg.norm_offset
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps, ops, offset)
        self.attention = Attention(cfg, layer_idx, ops)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps, ops, offset)
        self.mlp = MLP(cfg, ops)
        self.attention_post_norm = RMSNorm(cfg.dim, cfg.norm_eps, ops, offset) if cfg.sandwich_norm else None
        self.mlp_post_norm = RMSNorm(cfg.dim, cfg.norm_eps, ops, offset) if cfg.sandwich_norm else None
        self.fuse_residual_norm = True

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: KVCache | None = None,
        start_pos: int | RowPositions = 0,
        attn_mask: torch.Tensor | BlockMasks | None = None,
    ) -> torch.Tensor:
        a = self.attention(self.attention_norm(x), cos, sin, kv_cache, start_pos, attn_mask)
        if self.attention_post_norm is not None:
            a = self.attention_post_norm(a)
        if self.fuse_residual_norm:
            normed, h = self.mlp_norm.add(x, a)
        else:
            h = x + a
            normed = self.mlp_norm(h)
        m = self.mlp(normed)
        return h + (m if self.mlp_post_norm is None else self.mlp_post_norm(m))


def segment_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """Attention mask [B, 1, T, T] of packed rows: causal, and within each token's own segment."""
    T = segment_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).tril()
    return ((segment_ids[:, :, None] == segment_ids[:, None, :]) & causal)[:, None]


def rope_cache(
    head_dim: int, max_seq_len: int, theta: float, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [max_seq_len, head_dim] in fp32, computed the way HF's default RoPE does.

    Frequencies are duplicated ([f, f]) to pair dim i with i + head_dim/2 (rotate_half).
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    t = torch.arange(max_seq_len, dtype=torch.float32, device=device)
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


class Transformer(nn.Module):
    """Llama-style decoder. ``vocab_size`` is the already padded embedding row count.

    The constructor builds the modules only; use :func:`~orchestra.model.build.build_model` for
    a model with the configured initialisation, or for one whose weights are about to be loaded.
    """

    def __init__(self, cfg: ModelConfig, vocab_size: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.vocab_size = vocab_size
        # One ops handle for the whole model; each op runs the table for its tensors' device.
        self.ops = device_ops(cfg.kernels)

        self.tok_embeddings = nn.Embedding(vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i, self.ops) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps, self.ops, cfg.norm_offset)
        self.lm_head = nn.Linear(cfg.dim, vocab_size, bias=False)
        if cfg.tie_embeddings:
            # The same Parameter object: optimizers, FSDP and state_dict all see one tensor.
            self.lm_head.weight = self.tok_embeddings.weight

        # Non-persistent: derived from the config, so not saved in checkpoints; rebuilt by
        # reset_rope_cache() after meta-device construction.
        self.rope_cos: torch.Tensor
        self.rope_sin: torch.Tensor
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        # Gemma 3: the windowed layers rotate with their own base frequency.
        self.rope_local_cos: torch.Tensor
        self.rope_local_sin: torch.Tensor
        self.register_buffer("rope_local_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_local_sin", torch.empty(0), persistent=False)
        self.reset_rope_cache()

    def reset_rope_cache(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the fp32 cos/sin buffers, e.g. after ``to_empty`` from the meta device."""
        if device is None:
            device = self.tok_embeddings.weight.device
        cos, sin = rope_tables(self.cfg, self.cfg.max_seq_len, device)
        self.rope_cos = cos
        self.rope_sin = sin
        local = local_rope_tables(self.cfg, self.cfg.max_seq_len, device)
        if local is not None:
            self.rope_local_cos, self.rope_local_sin = local

    def forward(
        self,
        tokens: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        segment_ids: torch.Tensor | None = None,
        per_sequence: bool = False,
        kv_cache: KVCache | None = None,
        start_pos: int | torch.Tensor = 0,
        prefix_embeds: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits [B, T, V] in fp32, or with ``targets`` the mean cross-entropy (ignoring IGNORE_INDEX).

        The loss is computed here, from the final hidden states and lm_head.weight through
        ops.linear_cross_entropy, so a fused kernel never materialises the [B*T, V] logits and a
        sharding wrapper sees the weight used inside this module's forward. ``per_sequence``
        returns each row's summed loss [B] instead (negative log-likelihood of its targets, as
        DPO needs). ``segment_ids`` [B, T] marks packed examples and ``prefix_embeds`` are input
        embeddings placed before the tokens (see :meth:`hidden_states`); logits and targets cover
        the tokens only. ``last_only`` returns the last position's logits [B, 1, V] alone, as a
        generation prefill needs: the output projection then costs one position, not T.
        """
        h = self.hidden_states(
            tokens,
            segment_ids=segment_ids,
            kv_cache=kv_cache,
            start_pos=start_pos,
            prefix_embeds=prefix_embeds,
        )
        if targets is None:
            return self.logits(h[:, -1:] if last_only else h)
        cap = self.cfg.final_softcap
        B, T = tokens.shape
        if per_sequence:
            return torch.stack(
                [
                    self.ops.linear_cross_entropy(
                        h[b],
                        self.lm_head.weight,
                        targets[b],
                        ignore_index=IGNORE_INDEX,
                        reduction="sum",
                        logit_softcap=cap,
                    )
                    for b in range(B)
                ]
            )
        return self.ops.linear_cross_entropy(
            h.reshape(B * T, -1),
            self.lm_head.weight,
            targets.reshape(B * T),
            ignore_index=IGNORE_INDEX,
            logit_softcap=cap,
        )

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """fp32 logits of final hidden states [..., dim] (soft-capped where the model caps them)."""
        logits = self.lm_head(h).float()
        cap = self.cfg.final_softcap
        return logits if cap is None else softcap(logits, cap)

    def hidden_states(
        self,
        tokens: torch.Tensor,
        *,
        segment_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        start_pos: int | torch.Tensor = 0,
        prefix_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final-norm hidden states [B, T, dim] of the tokens (the input of lm_head or of a task head).

        ``segment_ids`` [B, T] lets several examples share one row (packed fine-tuning data): a
        token attends only to earlier tokens of its own segment. Positions are not reset per
        segment, and need not be: RoPE makes attention scores depend on relative offsets only, so
        an example packed at offset 100 gets the same outputs as on its own (up to rounding).

        ``prefix_embeds`` [B, P, dim] are input embeddings placed before the tokens' own (a soft
        prompt, for one): they take positions start_pos .. start_pos + P - 1, are written to a KV
        cache like tokens, and get no hidden states back, since nothing predicts them.

        ``start_pos`` as a tensor [B] gives every row its own start (continuous batching: rows
        at different lengths decode together); a KV cache is then required, the batch is its
        rows from ``kv_cache.first_row`` on, and each row sees only its own keys up to its
        position (:class:`RowPositions`).
        """
        B, T = tokens.shape
        P = 0 if prefix_embeds is None else prefix_embeds.shape[1]
        n = P + T  # positions this call fills
        if isinstance(start_pos, torch.Tensor):
            return self._row_hidden_states(tokens, kv_cache, start_pos, prefix_embeds)
        if n + start_pos > self.cfg.max_seq_len:
            what = f"{T} tokens" if P == 0 else f"{P} prefix embeddings + {T} tokens"
            raise ValueError(
                f"sequence of {what} starting at position {start_pos} needs {n + start_pos} positions, "
                f"but model.max_seq_len={self.cfg.max_seq_len}"
            )
        if kv_cache is not None and (n + start_pos > kv_cache.max_len or kv_cache.batch_size != B):
            raise ValueError(
                f"KV cache holds batch {kv_cache.batch_size} x {kv_cache.max_len} positions; "
                f"got batch {B} at positions {start_pos}..{start_pos + n - 1}"
            )
        if segment_ids is not None and (
            kv_cache is not None or prefix_embeds is not None or segment_ids.shape != tokens.shape
        ):
            raise ValueError(
                f"segment_ids must be [B, T] = {tuple(tokens.shape)} and used without a KV cache "
                "or prefix_embeds"
            )
        attn_mask = None if kv_cache is not None else self.attention_masks(segment_ids, B, n, tokens.device)

        h = self.embed(tokens, prefix_embeds)
        cos, sin, local = self.rope_window(start_pos, start_pos + n, tokens.device)
        for i, layer in enumerate(self.layers):
            c, s = local if self.cfg.is_windowed(i) else (cos, sin)
            h = layer(h, c, s, kv_cache, start_pos, attn_mask)
        h = self.norm(h)
        return h[:, P:] if P else h

    def attention_masks(
        self, segment_ids: torch.Tensor | None, batch: int, length: int, device: torch.device
    ) -> torch.Tensor | BlockMasks | None:
        """The masks every layer of a forward without a KV cache shares (``model.attention``).

        FlexAttention block masks (under flex, and under auto on CUDA for packed rows, sliding
        windows and soft-capped scores, which dense masks would push off the fast kernels); else
        the dense mask of packed rows, or None (each layer then uses is_causal or its window).
        """
        impl = AttentionImpl(self.cfg.attention)
        window = self.cfg.sliding_window
        needs_mask = (
            segment_ids is not None
            or (window is not None and window < length)
            or self.cfg.attn_softcap is not None
        )
        if impl == AttentionImpl.flex or (
            impl == AttentionImpl.auto and device.type == "cuda" and needs_mask
        ):
            return block_masks(segment_ids, batch, length, window, device)
        return segment_mask(segment_ids) if segment_ids is not None else None

    def rope_window(
        self, start: int, end: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """cos/sin [end - start, head_dim] of positions start..end-1, and the windowed layers' pair.

        Dynamic NTK / LongRoPE past the pretraining context get tables computed for this length.
        """
        if length_dependent(self.cfg) and end > original_length(self.cfg):
            cos, sin = rope_tables(self.cfg, end, device, seq_len=end)
            cos, sin = cos[start:end], sin[start:end]
        else:
            cos, sin = self.rope_cos[start:end], self.rope_sin[start:end]
        local = (cos, sin)
        if self.cfg.rope_local_theta is not None:
            local = (self.rope_local_cos[start:end], self.rope_local_sin[start:end])
        return cos, sin, local

    def embed(self, tokens: torch.Tensor, prefix_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Input embeddings [B, P + T, dim]: the prefix embeddings, then the tokens'."""
        B = tokens.shape[0]
        h = self.tok_embeddings(tokens)
        if self.cfg.scale_embeddings:
            # sqrt(dim) rounded to the weights' dtype first, as transformers' Gemma does.
            h = h * torch.tensor(self.cfg.dim**0.5, dtype=h.dtype, device=h.device)
        if prefix_embeds is not None:
            if prefix_embeds.shape[0] != B or prefix_embeds.shape[2] != self.cfg.dim:
                raise ValueError(
                    f"prefix_embeds must be [B, P, dim] with B={B}, dim={self.cfg.dim}; "
                    f"got {tuple(prefix_embeds.shape)}"
                )
            h = torch.cat([prefix_embeds.to(h.dtype), h], dim=1)
        return h

    def _row_hidden_states(
        self,
        tokens: torch.Tensor,
        kv_cache: KVCache | None,
        start_pos: torch.Tensor,
        prefix_embeds: torch.Tensor | None,
    ) -> torch.Tensor:
        """hidden_states with a start position per row (see there)."""
        B, T = tokens.shape
        P = 0 if prefix_embeds is None else prefix_embeds.shape[1]
        n = P + T
        if kv_cache is None or start_pos.shape != (B,):
            raise ValueError(
                f"per-row start positions must be [B] = [{B}] and come with a KV cache; "
                f"got shape {tuple(start_pos.shape)}" + ("" if kv_cache is not None else " and no cache")
            )
        end = int(start_pos.max()) + n
        limit = min(self.cfg.max_seq_len, kv_cache.max_len)
        if kv_cache.batch_size < kv_cache.first_row + B or end > limit or int(start_pos.min()) < 0:
            raise ValueError(
                f"KV cache holds batch {kv_cache.batch_size} x {kv_cache.max_len} positions "
                f"(model.max_seq_len={self.cfg.max_seq_len}); got batch {B} reaching position {end - 1}"
            )
        if length_dependent(self.cfg) and end > original_length(self.cfg):
            raise ValueError(
                f"per-row positions reach {end}, past rope.original_max_seq_len={original_length(self.cfg)}: "
                f"rope.type={self.cfg.rope.type} tables depend on the sequence length there"
            )
        positions = start_pos.to(tokens.device)[:, None] + torch.arange(n, device=tokens.device)
        rows = RowPositions(positions, end)
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]  # [B, n, hd]
        local = (cos, sin)
        if self.cfg.rope_local_theta is not None:
            local = (self.rope_local_cos[positions], self.rope_local_sin[positions])
        h = self.embed(tokens, prefix_embeds)
        for i, layer in enumerate(self.layers):
            c, s = local if self.cfg.is_windowed(i) else (cos, sin)
            h = layer(h, c, s, kv_cache, rows)
        return self.norm(h)[:, P:]

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Parameter count, a tied matrix counted once.

        ``exclude_embeddings`` drops the input embedding table, which is a lookup, not a matmul;
        with tied embeddings the shared matrix stays counted because it is also the output
        projection.
        """
        n = sum(p.numel() for p in self.parameters())  # parameters() already de-duplicates ties
        if exclude_embeddings and not self.cfg.tie_embeddings:
            n -= self.tok_embeddings.weight.numel()
        return n
