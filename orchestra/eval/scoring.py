"""Batched scoring with our model: continuation log-likelihoods, rolling document log-likelihoods, generation.

Every evaluation task and the lm-evaluation-harness adapter go through these three functions,
so a number means the same thing wherever it is reported. Requests are sorted by length and
right-padded: with causal attention a padded position comes after every real one and changes
nothing, so no attention mask is needed. Only the positions that are scored go through the
output projection (a [B, T, V] logits tensor is never built for a whole batch).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from orchestra.model.generate import context_length, generate, supports_left_padding
from orchestra.model.ops import softcap
from orchestra.model.transformer import Transformer


@dataclass(frozen=True)
class Scored:
    """One scored continuation: its summed log-probability, token count, and whether greedy decoding gives it."""

    logprob: float
    tokens: int
    greedy: bool


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _positions_logprobs(
    model: nn.Module, tokens: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor
) -> torch.Tensor:
    """log-softmax over the vocabulary at the (row, col) positions of a [B, T] batch -> [N, V] fp32."""
    if isinstance(model, Transformer):
        hidden = model.hidden_states(tokens)[rows, cols]
        logits = model.lm_head(hidden).float()
        cap = model.cfg.final_softcap
        if cap is not None:
            logits = softcap(logits, cap)
    else:  # a soft prompt: the wrapper places its virtual tokens and returns the real tokens' logits
        logits = model(tokens)[rows, cols].float()
    return F.log_softmax(logits, dim=-1)


@torch.no_grad()
def score_continuations(
    model: nn.Module,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    batch_size: int = 16,
) -> list[Scored]:
    """log p(continuation | context) for (context ids, continuation ids) pairs, in request order.

    Each input is ``(context + continuation)[-(L + 1):][:-1]`` for a context of L tokens (the
    same left truncation as lm-evaluation-harness), so a long context loses its oldest tokens.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    max_len = context_length(model)  # type: ignore[arg-type]
    for i, (_, cont) in enumerate(requests):
        if not cont:
            raise ValueError(f"request {i}: the continuation has no tokens to score")
        if len(cont) > max_len:
            raise ValueError(
                f"request {i}: the continuation has {len(cont)} tokens, more than the model's context of {max_len}"
            )
    inputs = []
    for ctx, cont in requests:
        whole = [*ctx, *cont][-(max_len + 1) :]
        inputs.append((whole[:-1], whole[-len(cont) :]))
    order = sorted(range(len(inputs)), key=lambda i: -len(inputs[i][0]))
    device = _device(model)
    out: list[Scored | None] = [None] * len(inputs)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = len(inputs[chunk[0]][0])
        batch = torch.zeros(len(chunk), width, dtype=torch.long)
        rows, cols, targets, owner = [], [], [], []
        for r, i in enumerate(chunk):
            inp, cont = inputs[i]
            batch[r, : len(inp)] = torch.tensor(inp)
            first = len(inp) - len(cont)  # the position whose output predicts cont[0]
            for j, tok in enumerate(cont):
                rows.append(r)
                cols.append(first + j)
                targets.append(tok)
                owner.append(r)
        logprobs = _positions_logprobs(
            model, batch.to(device), torch.tensor(rows, device=device), torch.tensor(cols, device=device)
        )
        target = torch.tensor(targets, device=device)
        picked = logprobs.gather(1, target[:, None])[:, 0].double().cpu()
        is_greedy = (logprobs.argmax(-1) == target).cpu()
        owners = torch.tensor(owner)
        for r, i in enumerate(chunk):
            mine = owners == r
            out[i] = Scored(float(picked[mine].sum()), int(mine.sum()), bool(is_greedy[mine].all()))
    return [s for s in out if s is not None]


def rolling_windows(
    tokens: Sequence[int], prefix_token: int, max_len: int, stride: int | None = None
) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) windows that score every token of a document exactly once.

    The document is conditioned on ``prefix_token`` (BOS, or EOS where there is none). Without a
    stride the windows are lm-evaluation-harness' (disjoint blocks of the full context, the last
    one with a full context); with one, each window scores ``stride`` new tokens after up to
    ``max_len - stride`` tokens of the document before them (the sliding window of Hugging Face's
    perplexity guide: smaller strides give each prediction more context and cost more forwards).
    """
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    if stride is not None and not 0 < stride <= max_len:
        raise ValueError(f"stride must be in [1, {max_len}] (the context), got {stride}")
    context = 1 if stride is None else max_len - stride + 1
    windows = get_rolling_token_windows(
        token_list=list(tokens), prefix_token=prefix_token, max_seq_len=max_len, context_len=context
    )
    return [make_disjoint_window(w) for w in windows]


@torch.no_grad()
def score_documents(
    model: nn.Module,
    documents: Sequence[Sequence[int]],
    prefix_token: int,
    batch_size: int = 16,
    stride: int | None = None,
) -> list[Scored]:
    """Summed log-likelihood and token count of every document (each on its own, windows batched together)."""
    max_len = context_length(model)  # type: ignore[arg-type]
    windows: list[tuple[list[int], list[int]]] = []
    owner: list[int] = []
    for d, doc in enumerate(documents):
        for window in rolling_windows(doc, prefix_token, max_len, stride):
            windows.append(window)
            owner.append(d)
    scored = score_continuations(model, windows, batch_size)
    sums = [0.0] * len(documents)
    counts = [0] * len(documents)
    greedy = [True] * len(documents)
    for d, s in zip(owner, scored, strict=True):
        sums[d] += s.logprob
        counts[d] += s.tokens
        greedy[d] &= s.greedy
    return [Scored(sums[d], counts[d], greedy[d]) for d in range(len(documents))]


@torch.no_grad()
def generate_batched(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    stop_ids: Sequence[int],
    batch_size: int = 16,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 1234,
) -> list[list[int]]:
    """The generated ids of every prompt (without the prompt; cut at the first stop id, which is dropped).

    Prompts are sorted by length and batched left-padded through one KV cache (the padding is
    masked, see :func:`~orchestra.model.generate.generate`), so neighbours differ by a few
    tokens of padding at most. Where padding would change the outputs (a soft prompt, dynamic
    NTK / LongRoPE past the original context) a batch holds prompts of one length only. A prompt
    longer than the context less ``max_new_tokens`` keeps its newest tokens. Sampling
    (temperature > 0) is seeded per batch.
    """
    max_len = context_length(model)  # type: ignore[arg-type]
    if max_new_tokens <= 0 or max_new_tokens >= max_len:
        raise ValueError(
            f"max_new_tokens must be in [1, {max_len - 1}] (the context less one), got {max_new_tokens}"
        )
    room = max_len - max_new_tokens
    clipped = [list(p)[-room:] for p in prompts]
    for i, p in enumerate(clipped):
        if not p:
            raise ValueError(f"prompt {i} has no tokens")
    order = sorted(range(len(clipped)), key=lambda i: (len(clipped[i]), i))
    pad_ok = supports_left_padding(model, max(map(len, clipped), default=0) + max_new_tokens)  # type: ignore[arg-type]
    batches: list[list[int]] = []
    for i in order:
        joins = bool(batches) and len(batches[-1]) < batch_size
        if joins and not pad_ok:
            joins = len(clipped[batches[-1][0]]) == len(clipped[i])
        if joins:
            batches[-1].append(i)
        else:
            batches.append([i])
    device = _device(model)
    out: list[list[int]] = [[] for _ in clipped]
    stops = set(stop_ids)
    for chunk in batches:
        lengths = [len(clipped[i]) for i in chunk]
        width = max(lengths)
        pad_id = clipped[chunk[0]][0]  # any id: padding is never attended to
        rows = [[pad_id] * (width - len(clipped[i])) + clipped[i] for i in chunk]
        generator = torch.Generator(device=device).manual_seed(seed + chunk[0])
        full = generate(
            model,  # type: ignore[arg-type]
            torch.tensor(rows, device=device),
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            eos_id=list(stop_ids),
            generator=generator,
            prompt_lengths=lengths,
        )
        for r, i in enumerate(chunk):
            new = full[r, width:].tolist()
            cut = next((j for j, t in enumerate(new) if t in stops), len(new))
            out[i] = new[:cut]
    return out
