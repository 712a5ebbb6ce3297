"""Prompt tuning (Lester et al. 2021): learned input embeddings prepended to every sequence."""

from __future__ import annotations

import torch
from torch import nn

from orchestra.model.transformer import KVCache, Transformer


class SoftPrompt(nn.Module):
    """``num_virtual_tokens`` learned input embeddings [P, dim] shared by every sequence."""

    def __init__(self, num_virtual_tokens: int, dim: int, init: torch.Tensor | None = None) -> None:
        super().__init__()
        if num_virtual_tokens <= 0:
            raise ValueError(f"num_virtual_tokens must be a positive integer, got {num_virtual_tokens}")
        weight = torch.empty(num_virtual_tokens, dim) if init is None else init.detach().clone()
        if weight.shape != (num_virtual_tokens, dim):
            raise ValueError(
                f"soft prompt init has shape {tuple(weight.shape)}, expected {(num_virtual_tokens, dim)}"
            )
        if init is None:
            nn.init.normal_(weight, std=0.02)
        self.weight = nn.Parameter(weight)

    def forward(self, batch_size: int) -> torch.Tensor:
        return self.weight.unsqueeze(0).expand(batch_size, -1, -1)


class PromptTunedModel(nn.Module):
    """A frozen Transformer with a trainable :class:`SoftPrompt` prepended to its input.

    The soft prompt starts as the embeddings of ``num_virtual_tokens`` vocabulary tokens drawn
    with a seeded generator (Lester et al. found vocabulary init better than random), kept in
    ``init_token_ids`` so the wrapped model initially equals the base run on those tokens.
    It reaches the model as ``prefix_embeds``, so it takes the first ``num_virtual_tokens``
    positions and only :attr:`max_real_tokens` remain for real tokens.

    Incremental decoding uses the base model's :class:`~orchestra.model.transformer.KVCache`
    sized for virtual + real positions: the prefill (``start_pos=0``) writes the soft prompt's
    keys/values along with the prompt's, and later steps are plain base-model steps at
    position ``num_virtual_tokens + start_pos``, so decoding costs what the base model's does.
    """

    def __init__(
        self, model: Transformer, num_virtual_tokens: int, seed: int = 0, freeze_base: bool = True
    ) -> None:
        super().__init__()
        self.model = model
        self.num_virtual_tokens = num_virtual_tokens
        if num_virtual_tokens >= model.cfg.max_seq_len:
            raise ValueError(
                f"num_virtual_tokens={num_virtual_tokens} leaves no room in model.max_seq_len={model.cfg.max_seq_len}"
            )
        if freeze_base:
            model.requires_grad_(False)
        emb = model.tok_embeddings.weight
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, emb.shape[0], (num_virtual_tokens,), generator=gen)
        self.init_token_ids: torch.Tensor
        self.register_buffer("init_token_ids", ids.to(emb.device), persistent=False)
        self.soft_prompt = SoftPrompt(
            num_virtual_tokens, emb.shape[1], init=emb.detach()[self.init_token_ids]
        )

    @property
    def max_real_tokens(self) -> int:
        """Positions left for real tokens once the soft prompt has taken its share of max_seq_len."""
        return self.model.cfg.max_seq_len - self.num_virtual_tokens

    def forward(
        self,
        tokens: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        kv_cache: KVCache | None = None,
        start_pos: int = 0,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits [B, T, V] for the real positions only, or the mean loss over real targets.

        ``start_pos`` counts real tokens. At 0 the soft prompt is prepended (a whole sequence,
        or the prefill of ``kv_cache``); above 0 the call continues the sequence the cache holds,
        soft prompt included, so a cache is required there.
        """
        m = self.model
        B, T = tokens.shape
        P = self.num_virtual_tokens
        if start_pos < 0:
            raise ValueError(f"start_pos must be >= 0 (it counts real tokens), got {start_pos}")
        if P + start_pos + T > m.cfg.max_seq_len:
            raise ValueError(
                f"{start_pos + T} tokens plus {P} virtual tokens need {P + start_pos + T} positions, but "
                f"model.max_seq_len={m.cfg.max_seq_len}; prompt tuning leaves {self.max_real_tokens} for real tokens"
            )
        if start_pos > 0:
            if kv_cache is None:
                raise ValueError(
                    f"start_pos={start_pos} continues a sequence whose soft prompt and earlier tokens live in a "
                    "KV cache; pass kv_cache (or start_pos=0 with the whole sequence)"
                )
            # Keys/values of the soft prompt are in the cache: a plain base-model step, shifted by P.
            return m(tokens, targets, kv_cache=kv_cache, start_pos=P + start_pos, last_only=last_only)
        if kv_cache is not None and (kv_cache.max_len < P + T or kv_cache.batch_size != B):
            raise ValueError(
                f"KV cache holds batch {kv_cache.batch_size} x {kv_cache.max_len} positions; the prefill needs "
                f"batch {B} x {P + T} ({P} virtual + {T} real tokens)"
            )
        # Virtual positions predict nothing: logits and loss cover the real tokens only.
        return m(tokens, targets, kv_cache=kv_cache, prefix_embeds=self.soft_prompt(B), last_only=last_only)
