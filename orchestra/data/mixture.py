"""Mixtures: how many times each training document of each source is written, so every source
gets its share of the training tokens.

A source's target is set one of three ways (``data.pipeline.sources[i]``):

    epochs: e      e times its own tokens (2.0 upsamples it twice, 0.5 keeps half)
    weight: w      a share of the weighted sources' tokens: their natural total split by the
                   weights (normalised over the weighted sources)
    neither        its tokens as read

The plan is made from the tokens each document actually encodes to (the issue is tokens, not
characters: code and prose tokenize very differently). Every document is written
``floor(factor)`` times; the fractional part picks further documents in a seeded order until
the source's target is met, so the plan is deterministic and within one document of exact.
Only the training split is mixed: validation stays one copy of each held-out document, and no
held-out document is ever repeated into training.

The result is ordinary shards: the global-index sampler reads them unchanged, so resume stays
exact. The manifest records the plan per source (natural and written tokens, factor).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from orchestra.config import SourceSpec
from orchestra.data.errors import DataError


@dataclass(frozen=True)
class SourceShare:
    """What the plan does to one source's training documents."""

    name: str
    natural_tokens: int
    target_tokens: int
    tokens: int  # what is written
    documents: int  # natural training documents
    copies: int  # documents written, repeats included
    weight: float | None
    epochs: float | None

    @property
    def factor(self) -> float:
        return self.tokens / self.natural_tokens if self.natural_tokens else 0.0

    def to_dict(self, total: int) -> dict[str, float | int | None]:
        return {
            "weight": self.weight,
            "epochs": self.epochs,
            "natural_tokens": self.natural_tokens,
            "target_tokens": self.target_tokens,
            "tokens": self.tokens,
            "share": round(self.tokens / total, 6) if total else 0.0,
            "factor": round(self.factor, 6),
            "documents": self.documents,
            "copies": self.copies,
        }


def is_mixture(sources: Sequence[SourceSpec]) -> bool:
    """Whether any source asks for something other than its tokens as read."""
    return any(s.weight is not None or s.epochs is not None for s in sources)


def targets(sources: Sequence[SourceSpec], natural: dict[str, int]) -> dict[str, int]:
    """Each source's target training tokens from its natural tokens and its weight or epochs."""
    weighted = [s for s in sources if s.epochs is None and s.weight is not None]
    pool = sum(natural.get(s.name, 0) for s in weighted)
    weights = sum(float(s.weight or 0.0) for s in weighted)
    out: dict[str, int] = {}
    for s in sources:
        tokens = natural.get(s.name, 0)
        if s.epochs is not None:
            out[s.name] = round(tokens * s.epochs)
        elif s.weight is not None:
            out[s.name] = round(pool * s.weight / weights)
        else:
            out[s.name] = tokens
    return out


def plan(
    sources: Sequence[SourceSpec], doc_sources: Sequence[str], doc_tokens: Sequence[int], seed: int
) -> tuple[list[int], dict[str, SourceShare]]:
    """Copies of every training document (aligned with ``doc_sources``) and the per-source outcome.

    ``doc_sources[i]`` names the source of the i-th training document, ``doc_tokens[i]`` its tokens.
    """
    natural: dict[str, int] = {}
    members: dict[str, list[int]] = {}
    for i, (name, tokens) in enumerate(zip(doc_sources, doc_tokens, strict=True)):
        natural[name] = natural.get(name, 0) + tokens
        members.setdefault(name, []).append(i)
    empty = [s.name for s in sources if s.weight is not None and not natural.get(s.name)]
    if empty:
        raise DataError(
            f"data.pipeline.sources: {', '.join(empty)} has a weight but no training document left "
            "after filtering; its share cannot be filled (drop the source or its weight)"
        )
    goal = targets(sources, natural)
    copies = [1] * len(doc_sources)
    shares: dict[str, SourceShare] = {}
    for s in sources:
        docs = members.get(s.name, [])
        have, want = natural.get(s.name, 0), goal.get(s.name, 0)
        written = have
        if docs and have and want != have:
            whole = math.floor(want / have)
            for i in docs:
                copies[i] = whole
            written = whole * have
            # Top up with documents in a seeded order (per source: adding a source does not
            # reshuffle another's choice) until the target is reached or passed by one document.
            order = list(docs)
            random.Random(f"{seed}:{s.name}").shuffle(order)
            for i in order:
                if written >= want:
                    break
                copies[i] += 1
                written += doc_tokens[i]
        shares[s.name] = SourceShare(
            name=s.name,
            natural_tokens=have,
            target_tokens=want,
            tokens=written,
            documents=len(docs),
            copies=sum(copies[i] for i in docs),
            weight=s.weight,
            epochs=s.epochs,
        )
    return copies, shares
