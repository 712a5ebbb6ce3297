"""What one evaluation task is, and the per-rank plumbing every task shares.

A task turns a model and an :class:`~orchestra.config.EvalConfig` into a :class:`TaskResult`:
its metrics, one record per example (what ``orchestra-eval compare`` pairs two models on) and
which record fields the paired statistics read. Each rank scores its share of the examples
(:meth:`Ranks.shard`) and the records are gathered in example order (:meth:`Ranks.gather`), so
metrics computed from them are the same at any world size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from orchestra.config import EvalConfig
from orchestra.eval.model import EvalModel

T = TypeVar("T")


class EvalDataError(ValueError):
    """An evaluation set that cannot be evaluated (empty, missing references, another tokenizer)."""


@dataclass(frozen=True)
class Paired:
    """A per-example field two models are compared on."""

    field: str
    higher_is_better: bool
    # Per-example weights (token counts for a token-weighted mean); None = a plain mean.
    weight: str | None = None
    # The paired test: permutation for 0/1 outcomes, bootstrap otherwise.
    test: str = "auto"


@dataclass
class TaskResult:
    metrics: dict[str, float]
    samples: list[dict[str, Any]] = field(default_factory=list)
    paired: dict[str, Paired] = field(default_factory=dict)
    # Anything else worth keeping (confusion matrix, per-class scores, lm-eval's own results).
    details: dict[str, Any] = field(default_factory=dict)


class Ranks:
    """This process's place among the evaluation's ranks (one rank without torch.distributed)."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self._dist = dist if dist.is_available() and dist.is_initialized() else None
        self.rank = self._dist.get_rank() if self._dist else 0
        self.world = self._dist.get_world_size() if self._dist else 1

    def shard(self, items: Sequence[T]) -> list[tuple[int, T]]:
        """(index, item) of this rank's share: every world-th item, starting at its rank."""
        return [(i, items[i]) for i in range(self.rank, len(items), self.world)]

    def gather(self, records: list[tuple[int, T]]) -> list[T]:
        """Every rank's (index, record) pairs, in index order, on every rank."""
        if self._dist is None:
            return [r for _, r in sorted(records, key=lambda p: p[0])]
        parts: list[list[tuple[int, T]] | None] = [None] * self.world
        self._dist.all_gather_object(parts, records)
        merged = [p for part in parts for p in (part or [])]
        return [r for _, r in sorted(merged, key=lambda p: p[0])]


@dataclass(frozen=True)
class EvalTask:
    """One task: its name and how it runs (see the module docstring)."""

    name: str
    run: Callable[[EvalModel, EvalConfig, Ranks], TaskResult]
    # Needs the language-model head (a classifier checkpoint can run only tasks without it).
    lm_head: bool = True


def limited(items: list[T], limit: int | None) -> list[T]:
    return items if limit is None else items[:limit]
