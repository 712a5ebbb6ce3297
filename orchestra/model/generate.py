"""Autoregressive sampling with a KV cache: prefill the prompt once, then one token per step.

Works for a :class:`~orchestra.model.transformer.Transformer` (LoRA merged or adapters attached)
and for a :class:`~orchestra.model.peft.PromptTunedModel`, whose soft prompt takes the first
cache positions and so shortens the context left for real tokens (:func:`context_length`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from orchestra.model.config import RopeType
from orchestra.model.peft import PromptTunedModel
from orchestra.model.rope import length_dependent, original_length
from orchestra.model.transformer import KVCache, Transformer


def _unwrap(model: Transformer | PromptTunedModel) -> tuple[Transformer, int]:
    """(the Transformer holding the weights, positions a soft prompt takes before the real tokens)."""
    if isinstance(model, PromptTunedModel):
        return model.model, model.num_virtual_tokens
    return model, 0


def context_length(model: Transformer | PromptTunedModel) -> int:
    """Real tokens (prompt + generated) that fit: max_seq_len less any soft prompt's virtual tokens."""
    base, virtual = _unwrap(model)
    return base.cfg.max_seq_len - virtual


def _filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Set logits outside the top-k and outside the nucleus (top-p) to -inf; [B, V] -> [B, V]."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens strictly more likely already cover top_p; this always
        # keeps the most likely token.
        remove_sorted = (probs.cumsum(dim=-1) - probs) > top_p
        remove = remove_sorted.scatter(-1, sorted_idx, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def next_token(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Pick one token per row from last-position logits [B, V] -> [B, 1]."""
    if temperature == 0.0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = _filter_logits(logits / temperature, top_k, top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


def _switches_rope(base: Transformer, virtual: int, pos: int) -> bool:
    """Whether the token about to be fed (at position ``pos``) is the first past LongRoPE's original context."""
    cfg = base.cfg
    return (
        RopeType(cfg.rope.type) == RopeType.longrope
        and length_dependent(cfg)
        and virtual + pos == original_length(cfg)
    )


def supports_left_padding(model: Transformer | PromptTunedModel, end: int) -> bool:
    """Whether prompts of different lengths may share a left-padded batch filling ``end`` positions.

    Not with a soft prompt (padding would sit between it and the prompt) nor with dynamic NTK /
    LongRoPE past their original context (their tables depend on absolute length).
    """
    base, virtual = _unwrap(model)
    return not virtual and not (length_dependent(base.cfg) and end > original_length(base.cfg))


def _left_padding(
    model: Transformer | PromptTunedModel, prompt_lengths: Sequence[int] | None, B: int, T: int, end: int
) -> torch.Tensor | None:
    """Padding count per row [B] for a left-padded prompt, or None when no row is padded."""
    if prompt_lengths is None:
        return None
    lengths = list(prompt_lengths)
    if len(lengths) != B or any(not 1 <= n <= T for n in lengths):
        raise ValueError(f"prompt_lengths must be {B} lengths in [1, {T}] (the padded width), got {lengths}")
    if all(n == T for n in lengths):
        return None
    if not supports_left_padding(model, end):
        base, virtual = _unwrap(model)
        what = "a soft prompt" if virtual else f"rope.type={RopeType(base.cfg.rope.type).value}"
        raise ValueError(
            f"prompts of different lengths cannot share a batch with {what}: its outputs depend on "
            "absolute positions, which left padding shifts; batch prompts of one length"
        )
    return torch.tensor([T - n for n in lengths], dtype=torch.long)


@torch.no_grad()
def generate(
    model: Transformer | PromptTunedModel,
    prompt: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    prompt_lengths: Sequence[int] | None = None,
    stop_early: bool = True,
    logprobs: torch.Tensor | None = None,
) -> torch.Tensor:
    """Continue ``prompt`` ([B, T] or [T] token ids) by up to ``max_new_tokens`` tokens.

    Returns prompt + continuation with the prompt's shape convention ([B, T + n] or [T + n]).
    temperature=0 is greedy decoding. ``eos_id`` is one id or several (Llama 3.x Instruct stops
    on any of three): a row that has produced one of them is finished and keeps emitting the
    first, and generation stops as soon as every row is, so n may be < max_new_tokens.
    The model is put in eval mode for the call and its previous mode restored afterwards.

    ``prompt_lengths`` batches prompts of different lengths: ``prompt`` is left-padded and row
    b's prompt is its last ``prompt_lengths[b]`` tokens; the padding is never attended to (see
    :class:`~orchestra.model.transformer.KVCache`). Not for a soft prompt, nor for dynamic NTK /
    LongRoPE past their original context, whose outputs depend on absolute positions.

    ``stop_early=False`` runs all ``max_new_tokens`` steps even when every row has finished (a
    sharded model must run the same number of forwards on every rank). ``logprobs``, a [B,
    max_new_tokens] tensor, receives each emitted token's log-probability under the distribution it
    was sampled from (logits / temperature; the plain logits when greedy), which a training forward
    over the same tokens must reproduce (GRPO checks it).
    """
    squeeze = prompt.dim() == 1
    if squeeze:
        prompt = prompt.unsqueeze(0)
    if prompt.dim() != 2:
        raise ValueError(f"prompt must be [T] or [B, T] token ids, got shape {tuple(prompt.shape)}")
    B, T = prompt.shape
    if T == 0 or B == 0:
        raise ValueError("prompt is empty: generation needs at least one prompt token per row")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    base, virtual = _unwrap(model)
    max_len = context_length(model)
    if T + max_new_tokens > max_len:
        limit = f"model.max_seq_len={base.cfg.max_seq_len}"
        if virtual:
            limit += f" less {virtual} virtual tokens of the soft prompt = {max_len}"
        raise ValueError(
            f"prompt length {T} + max_new_tokens {max_new_tokens} = {T + max_new_tokens} exceeds "
            f"{limit}; shorten the prompt or ask for fewer tokens"
        )
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k <= 0:
        raise ValueError(f"top_k must be a positive integer or None, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")
    stop = [eos_id] if isinstance(eos_id, int) else list(eos_id or ())
    pad = _left_padding(model, prompt_lengths, B, T, T + max_new_tokens)

    was_training = model.training
    model.eval()
    try:
        param = base.tok_embeddings.weight
        out = prompt.to(param.device)
        if max_new_tokens > 0:
            # Positions count from the soft prompt's first virtual token; start_pos counts real ones.
            cache = KVCache(B, base.cfg, virtual + T + max_new_tokens, device=param.device, dtype=param.dtype)
            if pad is not None:
                cache.set_left_padding(pad.to(param.device))
            finished = torch.zeros(B, dtype=torch.bool, device=param.device)
            stop_ids = torch.tensor(stop, dtype=torch.long, device=param.device)
            logits = model(out, kv_cache=cache, start_pos=0, last_only=True)[:, -1]
            pos = T
            for step in range(max_new_tokens):
                tok = next_token(logits, temperature, top_k, top_p, generator)
                if stop:
                    tok = tok.masked_fill(finished[:, None], stop[0])
                    finished |= torch.isin(tok[:, 0], stop_ids)
                if logprobs is not None:
                    scaled = logits.float() / temperature if temperature > 0 else logits.float()
                    logprobs[:, step] = torch.log_softmax(scaled, dim=-1).gather(1, tok)[:, 0]
                out = torch.cat([out, tok], dim=1)
                if (stop_early and stop and bool(finished.all())) or step == max_new_tokens - 1:
                    break
                if _switches_rope(base, virtual, pos):
                    # LongRoPE changes every position's rotation once the sequence passes the
                    # original context: recompute the whole cache with the long factors, as
                    # transformers' Phi-3 does, instead of mixing short- and long-rotated keys.
                    logits = model(out, kv_cache=cache, start_pos=0, last_only=True)[:, -1]
                else:
                    logits = model(tok, kv_cache=cache, start_pos=pos)[:, -1]
                pos += 1
    finally:
        model.train(was_training)
    return out[0] if squeeze else out
